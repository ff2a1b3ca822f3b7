//! The Hugging Face format, out and in: a directory `transformers.BertForMaskedLM
//! .from_pretrained` loads, and the same directory (or a user's copy of `bert-base-uncased`)
//! as the starting point of a run.
//!
//! ```text
//! DIR/model.safetensors      the weights, f32, named as BertForMaskedLM names them
//! DIR/config.json            the shape; hidden_act "gelu_pytorch_tanh" (the trainer's GELU)
//! DIR/vocab.txt              the WordPiece vocabulary
//! DIR/tokenizer_config.json  BertTokenizer, lower case
//! ```
//!
//! Names, ours → theirs (every tensor is a contiguous piece of the flat vector, so the
//! export writes slices of it and the import fills them back, bit for bit):
//!
//! ```text
//! embeddings.word / position / token_type   bert.embeddings.{word,position,token_type}_embeddings.weight
//! embeddings.ln.{weight,bias}               bert.embeddings.LayerNorm.{weight,bias}
//! layer.l.qkv.weight (3C,C) rows 0..C       bert.encoder.layer.l.attention.self.query.weight (C,C)
//!                          rows C..2C       ...attention.self.key.weight, rows 2C..3C ...value.weight
//! layer.l.qkv.bias (3C)                     ...attention.self.{query,key,value}.bias (C) each
//! layer.l.attn_out / ln1                    ...attention.output.dense / attention.output.LayerNorm
//! layer.l.ffn_in / ffn_out / ln2            ...intermediate.dense / output.dense / output.LayerNorm
//! head.dense / head.ln                      cls.predictions.transform.dense / .transform.LayerNorm
//! head.decoder.bias                         cls.predictions.bias
//! (the word embedding)                      cls.predictions.decoder.weight: tied, not written
//! ```
//!
//! Reading accepts what real checkpoints hold besides: names without the `bert.` prefix
//! (a `BertModel` file), TensorFlow-era `LayerNorm.gamma`/`beta`, and tensors the trainer has
//! no use for (the pooler, the next-sentence head, the `position_ids`/`token_type_ids`
//! buffers). A decoder weight or bias written out must equal the tensor it is tied to.
//! Anything else, a missing tensor, a shape or dtype other than the model's, or a
//! `config.json` that disagrees with the model, is refused with the file and tensor named.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};

use super::files::{read_limited, shown};
use super::model::{ModelConfig, ParamLayout};
use super::ops::LAYERNORM_EPS;
use crate::error::{Error, Result};

/// The weights file of a directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The shape file of a directory.
pub const CONFIG_FILE: &str = "config.json";
/// The vocabulary file of a directory.
pub const VOCAB_FILE: &str = "vocab.txt";
/// Largest `config.json` read (bytes): a real one is under 1 kB.
pub const CONFIG_MAX_BYTES: u64 = 1 << 20;
/// Largest weights file read (bytes): 4 bytes per parameter, 5.7 G parameters.
pub const WEIGHTS_MAX_BYTES: u64 = 1 << 34;

/// The `hidden_act` written: PyTorch's tanh approximation of GELU, the one the trainer
/// computes (`gelu_new` names the same function in transformers).
pub const HIDDEN_ACT: &str = "gelu_pytorch_tanh";

const TARGET: &str = "hetccl::trainer::hf";

/// One tensor of the Hugging Face file: its name, shape and place in the flat vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HfTensor {
    /// Name in `BertForMaskedLM`'s state dict, e.g. `bert.encoder.layer.0.attention.self.key.weight`.
    pub name: String,
    /// Shape, row-major (PyTorch's `Linear` weight is (out, in), as ours).
    pub shape: Vec<usize>,
    /// Where its values live in the flat parameter vector.
    pub range: Range<usize>,
}

fn fail(path: &Path, reason: impl Into<String>) -> Error {
    Error::HfModel {
        path: shown(path).display().to_string(),
        reason: reason.into(),
    }
}

/// The Hugging Face tensors of `layout`, in its memory order; together they cover the flat
/// vector exactly once.
pub fn tensor_map(layout: &ParamLayout) -> Vec<HfTensor> {
    let mut out = Vec::with_capacity(layout.tensors.len() + 4 * layout.layers.len());
    for t in &layout.tensors {
        let one = |name: String| HfTensor {
            name,
            shape: t.shape.clone(),
            range: t.range.clone(),
        };
        let fixed = match t.name.as_str() {
            "embeddings.word" => Some("bert.embeddings.word_embeddings.weight"),
            "embeddings.position" => Some("bert.embeddings.position_embeddings.weight"),
            "embeddings.token_type" => Some("bert.embeddings.token_type_embeddings.weight"),
            "embeddings.ln.weight" => Some("bert.embeddings.LayerNorm.weight"),
            "embeddings.ln.bias" => Some("bert.embeddings.LayerNorm.bias"),
            "head.dense.weight" => Some("cls.predictions.transform.dense.weight"),
            "head.dense.bias" => Some("cls.predictions.transform.dense.bias"),
            "head.ln.weight" => Some("cls.predictions.transform.LayerNorm.weight"),
            "head.ln.bias" => Some("cls.predictions.transform.LayerNorm.bias"),
            "head.decoder.bias" => Some("cls.predictions.bias"),
            _ => None,
        };
        if let Some(name) = fixed {
            out.push(one(name.into()));
            continue;
        }
        // layer.{l}.{part}.{weight|bias}
        let Some((l, part)) = t
            .name
            .strip_prefix("layer.")
            .and_then(|s| s.split_once('.'))
        else {
            continue;
        };
        let prefix = format!("bert.encoder.layer.{l}");
        let (module, kind) = part.rsplit_once('.').unwrap_or((part, ""));
        if module == "qkv" {
            // (3C,C) or (3C): three equal blocks of rows, query then key then value.
            let block = t.range.len() / 3;
            let mut shape = t.shape.clone();
            shape[0] /= 3;
            for (i, which) in ["query", "key", "value"].into_iter().enumerate() {
                let start = t.range.start + i * block;
                out.push(HfTensor {
                    name: format!("{prefix}.attention.self.{which}.{kind}"),
                    shape: shape.clone(),
                    range: start..start + block,
                });
            }
            continue;
        }
        let theirs = match module {
            "attn_out" => "attention.output.dense",
            "ln1" => "attention.output.LayerNorm",
            "ffn_in" => "intermediate.dense",
            "ffn_out" => "output.dense",
            "ln2" => "output.LayerNorm",
            _ => continue,
        };
        out.push(one(format!("{prefix}.{theirs}.{kind}")));
    }
    out
}

/// An f32 tensor as safetensors writes it: little-endian bytes, borrowed where the
/// machine is little-endian.
struct F32View<'a> {
    shape: Vec<usize>,
    bytes: Cow<'a, [u8]>,
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn le_bytes(v: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(v))
    } else {
        Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

/// `config.json` of `cfg` as `transformers.BertConfig` reads it. The trainer trains
/// without dropout, so the dropout probabilities are 0: HF's training mode then computes
/// what the trainer computes.
pub fn config_json(cfg: &ModelConfig) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.ffn,
        "hidden_act": HIDDEN_ACT,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": cfg.max_position,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": 0.02,
        "layer_norm_eps": LAYERNORM_EPS,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes)
        .map_err(|e| Error::io(format!("writing {}", shown(path).display()), e))
}

/// Writes `params` (laid out for `cfg`) and `vocab` (the vocabulary file's text) as a
/// Hugging Face `BertForMaskedLM` directory, created if needed; files of the same names
/// in it are replaced.
pub fn export(dir: &Path, cfg: &ModelConfig, params: &[f32], vocab: &str) -> Result<()> {
    cfg.validate()?;
    let layout = ParamLayout::new(cfg);
    if params.len() != layout.total {
        return Err(Error::invalid(
            "hf::export",
            format!(
                "{} parameters, a model of this shape has {}",
                params.len(),
                layout.total
            ),
        ));
    }
    let vocab_entries = vocab.lines().count();
    if vocab_entries != cfg.vocab_size {
        return Err(Error::invalid(
            "hf::export",
            format!(
                "the vocabulary has {vocab_entries} entries, the model's vocab_size is {}",
                cfg.vocab_size
            ),
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", shown(dir).display()), e))?;
    let tensors = tensor_map(&layout).into_iter().map(|t| {
        let view = F32View {
            shape: t.shape,
            bytes: le_bytes(&params[t.range]),
        };
        (t.name, view)
    });
    // transformers refuses a safetensors file whose metadata does not name its framework.
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights = dir.join(WEIGHTS_FILE);
    // In memory, then written as any file (serialize_to_file's temporary is private to
    // the owner, and the result should be readable as the other files are).
    let bytes = safetensors::tensor::serialize(tensors, Some(meta))
        .map_err(|e| fail(&weights, format!("writing: {e}")))?;
    write_file(&weights, &bytes)?;
    let config = serde_json::to_string_pretty(&config_json(cfg))
        .map_err(|e| Error::invalid("hf::export", e.to_string()))?;
    write_file(&dir.join(CONFIG_FILE), format!("{config}\n").as_bytes())?;
    write_file(&dir.join(VOCAB_FILE), vocab.as_bytes())?;
    let tok = serde_json::json!({
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": true,
        "model_max_length": cfg.max_position,
    });
    write_file(
        &dir.join("tokenizer_config.json"),
        format!("{tok:#}\n").as_bytes(),
    )?;
    Ok(())
}

/// The model shape a directory's `config.json` states, after checking that it describes
/// a model the trainer computes: a BERT with absolute positions, tied decoder, GELU. An
/// erf GELU (`"gelu"`, as `bert-base-uncased` states) or another LayerNorm epsilon is
/// accepted with a warning: the trainer runs the tanh GELU and its own epsilon, a start
/// close to the original, not equal to it.
pub fn model_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join(CONFIG_FILE);
    let bytes = read_limited(&path, "Hugging Face config", CONFIG_MAX_BYTES)?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| fail(&path, format!("not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| fail(&path, "not a JSON object"))?;
    let text = |key: &str, default: &'static str| -> Result<String> {
        match obj.get(key) {
            None => Ok(default.into()),
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(fail(&path, format!("{key} is {other}, expected a string"))),
        }
    };
    // Missing keys take BertConfig's defaults, as transformers does.
    let count = |key: &str, default: usize| -> Result<usize> {
        match obj.get(key) {
            None => Ok(default),
            Some(x) => x
                .as_u64()
                .filter(|&n| n > 0)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| fail(&path, format!("{key} is {x}, expected a positive integer"))),
        }
    };
    let model_type = text("model_type", "bert")?;
    if model_type != "bert" {
        return Err(fail(
            &path,
            format!("model_type is {model_type:?}; only \"bert\" is accepted"),
        ));
    }
    let pos = text("position_embedding_type", "absolute")?;
    if pos != "absolute" {
        return Err(fail(
            &path,
            format!("position_embedding_type is {pos:?}; only \"absolute\" is accepted"),
        ));
    }
    if obj.get("tie_word_embeddings") == Some(&serde_json::Value::Bool(false)) {
        return Err(fail(
            &path,
            "tie_word_embeddings is false; the trainer's decoder is the word embedding (true accepted)",
        ));
    }
    let act = text("hidden_act", "gelu")?;
    match act.as_str() {
        "gelu_pytorch_tanh" | "gelu_new" => {}
        "gelu" => tracing::warn!(
            target: TARGET,
            "{}: hidden_act \"gelu\" (erf); the trainer computes the tanh approximation, which differs by less than 1e-3 per activation",
            shown(&path).display()
        ),
        other => {
            return Err(fail(
                &path,
                format!(
                    "hidden_act is {other:?}; accepted: \"gelu_pytorch_tanh\", \"gelu_new\" (the trainer's GELU), \"gelu\" (close to it)"
                ),
            ))
        }
    }
    if let Some(eps) = obj.get("layer_norm_eps").and_then(|e| e.as_f64()) {
        if eps != LAYERNORM_EPS {
            tracing::warn!(
                target: TARGET,
                "{}: layer_norm_eps {eps:e}; the trainer's LayerNorm uses {LAYERNORM_EPS:e}",
                shown(&path).display()
            );
        }
    }
    let hidden = count("hidden_size", 768)?;
    let cfg = ModelConfig {
        vocab_size: count("vocab_size", 30522)?,
        max_position: count("max_position_embeddings", 512)?,
        type_vocab_size: count("type_vocab_size", 2)?,
        hidden,
        layers: count("num_hidden_layers", 12)?,
        heads: count("num_attention_heads", 12)?,
        ffn: count("intermediate_size", 3072)?,
    };
    cfg.validate()
        .map_err(|e| fail(&path, format!("a shape the trainer cannot run: {e}")))?;
    Ok(cfg)
}

/// Refuses a model shape `want` other than the one `dir`'s `config.json` states (`file`),
/// naming the first field that differs in both vocabularies.
pub fn check_shape(dir: &Path, file: &ModelConfig, want: &ModelConfig) -> Result<()> {
    match shape_mismatch(file, want) {
        Some(diff) => Err(fail(&dir.join(CONFIG_FILE), diff)),
        None => Ok(()),
    }
}

fn shape_mismatch(file: &ModelConfig, want: &ModelConfig) -> Option<String> {
    let fields = [
        ("vocab_size", "vocab_size", file.vocab_size, want.vocab_size),
        ("hidden_size", "hidden", file.hidden, want.hidden),
        ("num_hidden_layers", "layers", file.layers, want.layers),
        ("num_attention_heads", "heads", file.heads, want.heads),
        ("intermediate_size", "ffn", file.ffn, want.ffn),
        (
            "max_position_embeddings",
            "max_position",
            file.max_position,
            want.max_position,
        ),
        (
            "type_vocab_size",
            "type_vocab_size",
            file.type_vocab_size,
            want.type_vocab_size,
        ),
    ];
    fields
        .iter()
        .find(|f| f.2 != f.3)
        .map(|(theirs, ours, a, b)| format!("{theirs} is {a}, the model's {ours} is {b}"))
}

/// A file's name as the trainer's map spells it: with the `bert.` prefix, LayerNorm
/// parameters as `weight`/`bias`.
fn canonical(name: &str) -> String {
    let mut n = if ["embeddings.", "encoder.", "pooler."]
        .iter()
        .any(|p| name.starts_with(p))
    {
        format!("bert.{name}")
    } else {
        name.to_string()
    };
    for (old, new) in [
        ("LayerNorm.gamma", "LayerNorm.weight"),
        ("LayerNorm.beta", "LayerNorm.bias"),
    ] {
        if let Some(stem) = n.strip_suffix(old) {
            n = format!("{stem}{new}");
        }
    }
    n
}

/// Tensors of real checkpoints the trainer has no use for.
fn ignored(canonical: &str) -> bool {
    canonical.starts_with("bert.pooler.")
        || canonical.starts_with("cls.seq_relationship.")
        || canonical == "bert.embeddings.position_ids"
        || canonical == "bert.embeddings.token_type_ids"
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

/// The parameters in the file's bytes `bytes` (its name `path` for messages), laid out for
/// `cfg`.
pub fn params_from_safetensors(path: &Path, bytes: &[u8], cfg: &ModelConfig) -> Result<Vec<f32>> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| fail(path, format!("not a readable safetensors file: {e}")))?;
    // canonical name → name in the file
    let mut names: BTreeMap<String, &str> = BTreeMap::new();
    for name in st.names() {
        if let Some(prev) = names.insert(canonical(name), name) {
            return Err(fail(
                path,
                format!("tensors {prev:?} and {name:?} are the same tensor under two names"),
            ));
        }
    }
    let layout = ParamLayout::new(cfg);
    let map = tensor_map(&layout);
    let read = |canon: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let Some(&name) = names.get(canon) else {
            return Err(fail(
                path,
                format!(
                    "tensor {canon} is missing (a BertForMaskedLM file has it; {} tensors found)",
                    names.len()
                ),
            ));
        };
        let t = st
            .tensor(name)
            .map_err(|e| fail(path, format!("tensor {name}: {e}")))?;
        if t.dtype() != Dtype::F32 {
            return Err(fail(
                path,
                format!(
                    "tensor {name} is {}; only F32 is accepted (save the model in float32)",
                    dtype_name(t.dtype())
                ),
            ));
        }
        if t.shape() != shape {
            return Err(fail(
                path,
                format!(
                    "tensor {name} has shape {:?}, the model needs {shape:?}",
                    t.shape()
                ),
            ));
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    };
    let mut params = vec![0f32; layout.total];
    for t in &map {
        params[t.range.clone()].copy_from_slice(&read(&t.name, &t.shape)?);
    }
    // Tied copies, where a file carries them, must be what they are tied to.
    let word = &map[0];
    let bias = &map[map.len() - 1];
    for (copy, of) in [
        ("cls.predictions.decoder.weight", word),
        ("cls.predictions.decoder.bias", bias),
    ] {
        if names.contains_key(copy) {
            let values = read(copy, &of.shape)?;
            if values
                .iter()
                .zip(&params[of.range.clone()])
                .any(|(a, b)| a.to_bits() != b.to_bits())
            {
                return Err(fail(
                    path,
                    format!(
                        "tensor {copy} differs from {}: the trainer ties them, so they must be equal",
                        of.name
                    ),
                ));
            }
        }
    }
    let known: std::collections::HashSet<&str> = map.iter().map(|t| t.name.as_str()).collect();
    let unexpected: Vec<&str> = names
        .iter()
        .filter(|(canon, _)| {
            !known.contains(canon.as_str())
                && !ignored(canon)
                && !matches!(
                    canon.as_str(),
                    "cls.predictions.decoder.weight" | "cls.predictions.decoder.bias"
                )
        })
        .map(|(_, &name)| name)
        .collect();
    if !unexpected.is_empty() {
        let shown_names: Vec<&str> = unexpected.iter().take(5).copied().collect();
        return Err(fail(
            path,
            format!(
                "{} tensor(s) a BertForMaskedLM of this shape does not have: {}{}",
                unexpected.len(),
                shown_names.join(", "),
                if unexpected.len() > 5 { ", ..." } else { "" }
            ),
        ));
    }
    Ok(params)
}

/// The parameters of the Hugging Face directory `dir` for a model of shape `cfg`: its
/// `config.json` must state that shape, its `model.safetensors` hold every tensor of it.
pub fn import(dir: &Path, cfg: &ModelConfig) -> Result<Vec<f32>> {
    check_shape(dir, &model_config(dir)?, cfg)?;
    let path = weights_path(dir)?;
    let bytes = read_limited(&path, "Hugging Face weights file", WEIGHTS_MAX_BYTES)?;
    params_from_safetensors(&path, &bytes, cfg)
}

/// `dir/model.safetensors`, or why a directory without one cannot be read.
fn weights_path(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(WEIGHTS_FILE);
    if path.exists() {
        return Ok(path);
    }
    let other = [
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "tf_model.h5",
    ]
    .into_iter()
    .find(|f| dir.join(f).exists());
    Err(fail(
        &path,
        match other {
            Some(f) => format!(
                "not found (the directory has {f}, which is not read: save the model with \
                 save_pretrained(DIR, safe_serialization=True, max_shard_size=\"100GB\") to get one {WEIGHTS_FILE})"
            ),
            None => "not found (a Hugging Face model directory holds it)".into(),
        },
    ))
}

/// Whether the directory has a vocabulary file (a run started from it uses it by default).
pub fn vocab_path(dir: &Path) -> Option<PathBuf> {
    let p = dir.join(VOCAB_FILE);
    p.is_file().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_covers_the_flat_vector_once_in_order() {
        let cfg = ModelConfig {
            vocab_size: 11,
            max_position: 8,
            type_vocab_size: 2,
            hidden: 4,
            layers: 2,
            heads: 2,
            ffn: 8,
        };
        let layout = ParamLayout::new(&cfg);
        let map = tensor_map(&layout);
        // 5 embeddings + 16 per layer (qkv split in three, twice) + 5 head
        assert_eq!(map.len(), 5 + 2 * 16 + 5);
        let mut next = 0;
        for t in &map {
            assert_eq!(t.range.start, next, "{}", t.name);
            assert_eq!(
                t.range.len(),
                t.shape.iter().product::<usize>(),
                "{}",
                t.name
            );
            next = t.range.end;
        }
        assert_eq!(next, layout.total);
        let key = map
            .iter()
            .find(|t| t.name == "bert.encoder.layer.1.attention.self.key.weight")
            .unwrap();
        let qkv = layout
            .tensors
            .iter()
            .find(|t| t.name == "layer.1.qkv.weight")
            .unwrap();
        assert_eq!(key.shape, vec![4, 4]);
        assert_eq!(key.range.start, qkv.range.start + 16);
        assert_eq!(map.last().unwrap().name, "cls.predictions.bias");
    }

    #[test]
    fn canonical_names_take_the_prefix_and_the_old_layernorm_words() {
        assert_eq!(
            canonical("encoder.layer.3.output.LayerNorm.gamma"),
            "bert.encoder.layer.3.output.LayerNorm.weight"
        );
        assert_eq!(
            canonical("bert.embeddings.LayerNorm.beta"),
            "bert.embeddings.LayerNorm.bias"
        );
        assert_eq!(canonical("cls.predictions.bias"), "cls.predictions.bias");
    }
}
