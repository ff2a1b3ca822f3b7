//! Hugging Face directories out and in: the export read back bit for bit, the names real
//! checkpoints use, every refused file named with its tensor, and a run started from a
//! directory (library and command line).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use hetccl_testkit::Scratch;
use hetccl_trainer::hf::{self, CONFIG_FILE, WEIGHTS_FILE};
use hetccl_trainer::model::{init_params, ModelConfig, ParamLayout};
use hetccl_trainer::rng::{normal, Stream};
use hetccl_trainer::{train, with_threads, Settings, SingleProcess};
use safetensors::tensor::{serialize, Dtype, SafeTensors, TensorView};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("trainer/ sits in the repository")
}

fn scratch(name: &str) -> Scratch {
    Scratch::new(&format!("hf-{name}"))
}

fn tiny() -> ModelConfig {
    ModelConfig {
        vocab_size: 37,
        max_position: 12,
        type_vocab_size: 2,
        hidden: 8,
        layers: 2,
        heads: 2,
        ffn: 16,
    }
}

fn vocab_text(n: usize) -> String {
    (0..n).map(|i| format!("tok{i}\n")).collect()
}

/// Every parameter distinct (a swapped or shifted tensor shows), plus values whose bits
/// a conversion would change: -0, a subnormal, a NaN with a payload, infinities.
fn distinct_params(layout: &ParamLayout) -> Vec<f32> {
    let mut p: Vec<f32> = (0..layout.total)
        .map(|i| normal(5, Stream::Init, 1, i as u64) as f32)
        .collect();
    p[3] = -0.0;
    p[4] = f32::from_bits(1); // smallest subnormal
    p[5] = f32::from_bits(0x7fc0_1234);
    p[6] = f32::INFINITY;
    p[layout.total - 1] = f32::NEG_INFINITY;
    p
}

fn bits(p: &[f32]) -> Vec<u32> {
    p.iter().map(|x| x.to_bits()).collect()
}

fn exported(name: &str) -> (Scratch, Vec<f32>) {
    let dir = scratch(name);
    let layout = ParamLayout::new(&tiny());
    let params = distinct_params(&layout);
    hf::export(&dir, &tiny(), &params, &vocab_text(37)).unwrap();
    (dir, params)
}

#[test]
fn export_then_import_is_bit_exact() {
    let (dir, params) = exported("roundtrip");
    let back = hf::import(&dir, &tiny()).unwrap();
    assert_eq!(bits(&back), bits(&params));

    let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    // 5 embeddings + 2 layers × 16 (query/key/value apart) + 5 head; the decoder is tied
    assert_eq!(st.len(), 42);
    assert!(st.names().iter().all(|n| !n.contains("decoder")));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata().as_ref().unwrap().get("format").unwrap(),
        "pt"
    );
    // value = rows 2C..3C of the fused (3C,C) weight of layer 1
    let layout = ParamLayout::new(&tiny());
    let qkv = layout
        .tensors
        .iter()
        .find(|t| t.name == "layer.1.qkv.weight")
        .unwrap();
    let value = st
        .tensor("bert.encoder.layer.1.attention.self.value.weight")
        .unwrap();
    assert_eq!(value.shape(), &[8, 8]);
    let want: Vec<u8> = params[qkv.range.start + 128..qkv.range.end]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    assert_eq!(value.data(), &want[..]);

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(config["hidden_act"], "gelu_pytorch_tanh");
    assert_eq!(config["layer_norm_eps"], 1e-12);
    assert_eq!(config["architectures"][0], "BertForMaskedLM");
    assert_eq!(config["intermediate_size"], 16);
    assert_eq!(
        std::fs::read_to_string(dir.join("vocab.txt")).unwrap(),
        vocab_text(37)
    );
    assert_eq!(hf::model_config(&dir).unwrap(), tiny());
}

/// The exported file's tensors, as (name, dtype, shape, bytes), for rewriting.
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn tensors_of(dir: &Path) -> Tensors {
    let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect()
}

fn write_tensors(dir: &Path, tensors: &Tensors) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    std::fs::write(
        dir.join(WEIGHTS_FILE),
        serialize(views, Some(meta)).unwrap(),
    )
    .unwrap();
}

fn find<'a>(t: &'a mut Tensors, name: &str) -> &'a mut (String, Dtype, Vec<usize>, Vec<u8>) {
    t.iter_mut().find(|x| x.0 == name).unwrap()
}

fn f32_tensor(name: &str, shape: Vec<usize>, fill: f32) -> (String, Dtype, Vec<usize>, Vec<u8>) {
    let n: usize = shape.iter().product();
    let bytes = (0..n).flat_map(|_| fill.to_le_bytes()).collect();
    (name.to_string(), Dtype::F32, shape, bytes)
}

#[test]
fn the_names_of_real_checkpoints_are_read() {
    // As bert-base-uncased's files hold it: TensorFlow-era LayerNorm names, a pooler, the
    // next-sentence head, the position_ids buffer (int64) and the tied decoder written out.
    let (dir, params) = exported("real-names");
    let mut t = tensors_of(&dir);
    for x in t.iter_mut() {
        if let Some(stem) = x.0.strip_suffix("LayerNorm.weight") {
            x.0 = format!("{stem}LayerNorm.gamma");
        } else if let Some(stem) = x.0.strip_suffix("LayerNorm.bias") {
            x.0 = format!("{stem}LayerNorm.beta");
        }
    }
    let word = find(&mut t, "bert.embeddings.word_embeddings.weight").clone();
    let bias = find(&mut t, "cls.predictions.bias").clone();
    t.push((
        "cls.predictions.decoder.weight".into(),
        word.1,
        word.2,
        word.3,
    ));
    t.push((
        "cls.predictions.decoder.bias".into(),
        bias.1,
        bias.2,
        bias.3,
    ));
    t.push(f32_tensor("bert.pooler.dense.weight", vec![8, 8], 0.5));
    t.push(f32_tensor("bert.pooler.dense.bias", vec![8], 0.5));
    t.push(f32_tensor("cls.seq_relationship.weight", vec![2, 8], 0.5));
    t.push(f32_tensor("cls.seq_relationship.bias", vec![2], 0.5));
    let ids: Vec<u8> = (0..12i64).flat_map(|i| i.to_le_bytes()).collect();
    t.push((
        "bert.embeddings.position_ids".into(),
        Dtype::I64,
        vec![1, 12],
        ids,
    ));
    write_tensors(&dir, &t);
    assert_eq!(bits(&hf::import(&dir, &tiny()).unwrap()), bits(&params));

    // A file without the `bert.` prefix (as BertModel-style exports name the encoder).
    for x in t.iter_mut() {
        if let Some(rest) = x.0.strip_prefix("bert.") {
            x.0 = rest.to_string();
        }
    }
    write_tensors(&dir, &t);
    assert_eq!(bits(&hf::import(&dir, &tiny()).unwrap()), bits(&params));
}

/// The error of importing `dir` after `edit` rewrote its tensors.
fn refused(name: &str, edit: impl FnOnce(&mut Tensors)) -> (Scratch, String) {
    let (dir, _) = exported(name);
    let mut t = tensors_of(&dir);
    edit(&mut t);
    write_tensors(&dir, &t);
    let err = hf::import(&dir, &tiny()).unwrap_err().to_string();
    (dir, err)
}

fn weights(dir: &Path) -> String {
    dir.join(WEIGHTS_FILE).display().to_string()
}

#[test]
fn a_missing_tensor_is_named() {
    let (dir, err) = refused("missing", |t| {
        t.retain(|x| x.0 != "bert.encoder.layer.1.intermediate.dense.bias")
    });
    assert_eq!(
        err,
        format!(
            "Hugging Face model {}: tensor bert.encoder.layer.1.intermediate.dense.bias is \
             missing (a BertForMaskedLM file has it; 41 tensors found)",
            weights(&dir)
        )
    );
}

#[test]
fn a_wrong_shape_is_named_with_both_shapes() {
    let (dir, err) = refused("shape", |t| {
        let x = find(t, "bert.encoder.layer.0.attention.self.key.weight");
        x.2 = vec![4, 16];
    });
    assert_eq!(
        err,
        format!(
            "Hugging Face model {}: tensor bert.encoder.layer.0.attention.self.key.weight has \
             shape [4, 16], the model needs [8, 8]",
            weights(&dir)
        )
    );
}

#[test]
fn a_wrong_dtype_is_named() {
    let (dir, err) = refused("dtype", |t| {
        let x = find(t, "cls.predictions.transform.dense.bias");
        x.1 = Dtype::F16;
        x.3.truncate(16);
    });
    assert_eq!(
        err,
        format!(
            "Hugging Face model {}: tensor cls.predictions.transform.dense.bias is F16; only \
             F32 is accepted (save the model in float32)",
            weights(&dir)
        )
    );
}

#[test]
fn an_untied_decoder_and_unknown_tensors_are_refused() {
    let (dir, err) = refused("untied", |t| {
        let mut w = find(t, "bert.embeddings.word_embeddings.weight").clone();
        w.0 = "cls.predictions.decoder.weight".into();
        w.3[0] ^= 1;
        t.push(w);
    });
    assert_eq!(
        err,
        format!(
            "Hugging Face model {}: tensor cls.predictions.decoder.weight differs from \
             bert.embeddings.word_embeddings.weight: the trainer ties them, so they must be equal",
            weights(&dir)
        )
    );
    let (dir, err) = refused("unknown", |t| {
        t.push(f32_tensor(
            "bert.encoder.layer.0.attention.self.distance_embedding.weight",
            vec![23, 4],
            0.0,
        ))
    });
    assert_eq!(
        err,
        format!(
            "Hugging Face model {}: 1 tensor(s) a BertForMaskedLM of this shape does not \
             have: bert.encoder.layer.0.attention.self.distance_embedding.weight",
            weights(&dir)
        )
    );
}

#[test]
fn a_corrupt_or_absent_weights_file_is_named() {
    let (dir, _) = exported("corrupt");
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let err = hf::import(&dir, &tiny()).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "Hugging Face model {}: not a readable safetensors file: incomplete metadata, file not fully covered",
            weights(&dir)
        )
    );
    std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\xffjunk").unwrap();
    let err = hf::import(&dir, &tiny()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "Hugging Face model {}: not a readable safetensors file: ",
            weights(&dir)
        )),
        "{err}"
    );
    std::fs::remove_file(&path).unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"pickle").unwrap();
    let err = hf::import(&dir, &tiny()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "Hugging Face model {}: not found (the directory has pytorch_model.bin, which is not read",
            weights(&dir)
        )),
        "{err}"
    );
}

#[test]
fn a_config_that_disagrees_is_named() {
    let (dir, _) = exported("config");
    let config = dir.join(CONFIG_FILE);
    let err = hf::import(&dir, &ModelConfig { ffn: 32, ..tiny() })
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "Hugging Face model {}: intermediate_size is 16, the model's ffn is 32",
            config.display()
        )
    );
    let original = std::fs::read_to_string(&config).unwrap();
    for (from, to, want) in [
        (
            "\"gelu_pytorch_tanh\"",
            "\"relu\"",
            "hidden_act is \"relu\"; accepted: \"gelu_pytorch_tanh\", \"gelu_new\" (the \
             trainer's GELU), \"gelu\" (close to it)",
        ),
        (
            "\"position_embedding_type\": \"absolute\"",
            "\"position_embedding_type\": \"relative_key\"",
            "position_embedding_type is \"relative_key\"; only \"absolute\" is accepted",
        ),
        (
            "\"hidden_size\": 8",
            "\"hidden_size\": \"8\"",
            "hidden_size is \"8\", expected a positive integer",
        ),
        (
            "\"tie_word_embeddings\": true",
            "\"tie_word_embeddings\": false",
            "tie_word_embeddings is false; the trainer's decoder is the word embedding (true \
             accepted)",
        ),
    ] {
        assert!(original.contains(from), "{from}");
        std::fs::write(&config, original.replace(from, to)).unwrap();
        let err = hf::import(&dir, &tiny()).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("Hugging Face model {}: {want}", config.display())
        );
    }
    std::fs::write(&config, "{\"hidden_size\": 8,").unwrap();
    let err = hf::import(&dir, &tiny()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "Hugging Face model {}: not JSON: ",
            config.display()
        )),
        "{err}"
    );
    // bert-base-uncased states the erf GELU: accepted (a close start), shape as stated
    std::fs::write(
        &config,
        original.replace("\"gelu_pytorch_tanh\"", "\"gelu\""),
    )
    .unwrap();
    assert_eq!(hf::model_config(&dir).unwrap(), tiny());
    std::fs::remove_file(&config).unwrap();
    let err = hf::import(&dir, &tiny()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("reading Hugging Face config {}", config.display())),
        "{err}"
    );
}

fn small_model() -> ModelConfig {
    ModelConfig {
        vocab_size: 30522,
        max_position: 32,
        type_vocab_size: 2,
        hidden: 32,
        layers: 2,
        heads: 2,
        ffn: 64,
    }
}

#[test]
fn a_run_started_from_a_directory_starts_from_its_weights() {
    let dir = scratch("init-from");
    let text = std::fs::read_to_string(repo().join("data/tinyshakespeare.txt")).unwrap();
    std::fs::write(dir.join("corpus.txt"), &text[..20_000]).unwrap();
    let vocab = std::fs::read_to_string(repo().join("data/bert-base-uncased-vocab.txt")).unwrap();
    let (mut cfg, mut run) = Settings::default().resolve(1).unwrap();
    cfg.model = small_model();
    cfg.seq_len = 24;
    cfg.batch_size = 4;
    cfg.steps = 3;
    cfg.warmup_steps = 1;
    cfg.eval_every = 0;
    cfg.val_samples = 4;
    run.data = dir.join("corpus.txt").into();
    run.progress = false;
    run.threads = 1;
    let go = |run: &hetccl_trainer::RunOptions| {
        with_threads(1, || train(&cfg, run, &SingleProcess))
            .unwrap()
            .unwrap()
    };
    let fresh = go(&run);
    // The random init of the same seed, through a directory: the same run, bit for bit.
    let layout = ParamLayout::new(&small_model());
    let same = dir.join("same");
    hf::export(
        &same,
        &small_model(),
        &init_params(&layout, cfg.seed),
        &vocab,
    )
    .unwrap();
    run.init_from = Some(same);
    let from_dir = go(&run);
    let losses = |r: &hetccl_trainer::TrainReport| {
        r.steps.iter().map(|s| s.loss.to_bits()).collect::<Vec<_>>()
    };
    assert_eq!(losses(&from_dir), losses(&fresh));
    assert_eq!(bits(&from_dir.params), bits(&fresh.params));
    // Another init through a directory: another run.
    let other = dir.join("other");
    hf::export(&other, &small_model(), &init_params(&layout, 7), &vocab).unwrap();
    run.init_from = Some(other);
    let from_other = go(&run);
    assert_ne!(from_other.steps[0].loss, fresh.steps[0].loss);
}

fn bert(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hetccl-bert"))
        .current_dir(dir)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_command_line_exports_a_checkpoint_and_starts_from_the_directory() {
    let dir = scratch("cli");
    let quick: &[&str] = &[
        "--steps",
        "1",
        "--warmup-steps",
        "1",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--val-samples",
        "2",
        "--eval-every",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--metrics-out",
        "m.jsonl",
        "--plot-out",
        "loss.png",
    ];
    let small = [
        "--hidden",
        "16",
        "--layers",
        "1",
        "--heads",
        "2",
        "--max-position",
        "16",
    ];
    let o = bert(
        &dir,
        &[quick, &small[..], &["--checkpoint", "a.ckpt"]].concat(),
    );
    assert!(o.status.success(), "{}", text(&o));

    let o = bert(&dir, &["export", "--hf", "hf", "--checkpoint", "a.ckpt"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = dir.join("hf");
    assert!(
        text(&o).starts_with(&format!(
            "wrote {} (model.safetensors, config.json, vocab.txt): step 1 of {}",
            out.display(),
            dir.join("a.ckpt").display()
        )),
        "{}",
        text(&o)
    );
    let ck = hetccl_trainer::checkpoint::load(&dir.join("a.ckpt")).unwrap();
    let back = hf::import(&out, &ck.meta.config.model).unwrap();
    assert_eq!(bits(&back), bits(&ck.params));

    // The directory gives the shape: no model flags needed, and the run's checkpoint says so.
    let o = bert(
        &dir,
        &[quick, &["--init-from", "hf", "--checkpoint", "b.ckpt"]].concat(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let b = hetccl_trainer::checkpoint::load(&dir.join("b.ckpt")).unwrap();
    assert_eq!(b.meta.config.model, ck.meta.config.model);

    // A shape flag that disagrees with the directory, a resume at once, a missing checkpoint.
    let o = bert(
        &dir,
        &[quick, &["--init-from", "hf", "--hidden", "32"]].concat(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o),
        format!(
            "hetccl-bert: error: Hugging Face model {}: hidden_size is 16, the model's hidden \
             is 32 (leave the model settings out to take the directory's shape)\n",
            out.join("config.json").display()
        )
    );
    let o = bert(&dir, &["--init-from", "hf", "--resume", "a.ckpt"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("'--init-from <DIR>' cannot be used with '--resume <RESUME>'"),
        "{}",
        text(&o)
    );
    let o = bert(&dir, &["export", "--hf", "x", "--checkpoint", "none.ckpt"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains(&dir.join("none.ckpt").display().to_string()),
        "{}",
        text(&o)
    );
    assert!(!dir.join("x").exists());
}
