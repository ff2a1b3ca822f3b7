//! [`Compressor`]: the state that compression carries from one collective to the next.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::{Read, Write};

use half::{bf16, f16};

use super::{OverflowStats, WireFloat, WireFormat};
use crate::error::{Error, Result};

/// How values are scaled before the cast to 16 bits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScalePolicy {
    /// Multiply by `1/world_size`: the reduced sum is then the mean, and a sum of
    /// `world_size` in-range gradients cannot overflow the wire format.
    InverseWorldSize,
    /// Multiply by a fixed factor chosen by the caller (finite, > 0), e.g. a loss scale.
    Factor(f32),
}

/// Compression state owned by the caller across collectives: the wire format, the scale
/// policy, one f32 error-feedback residual per buffer, and overflow counters.
///
/// Buffers are named by a caller-chosen `u64` (a parameter-group index, say). A buffer's
/// residual covers the whole buffer; each call names the `offset` of the chunk it
/// compresses, as a ring does when it compresses different chunks at different steps.
/// The residual grows on first use and starts at zero.
///
/// [`Compressor::save`] / [`Compressor::load`] store all of it, so training resumed from a
/// checkpoint sends bitwise the same wire values as a run that never stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct Compressor {
    format: WireFormat,
    scale: ScalePolicy,
    error_feedback: bool,
    residuals: BTreeMap<u64, Vec<f32>>,
    /// Counts of finished collectives.
    total: OverflowStats,
    /// Counts since the last [`Compressor::finish_collective`].
    pending: OverflowStats,
    collectives: u64,
}

const MAGIC: &[u8; 8] = b"HCCLCMPR";
const VERSION: u32 = 1;
/// Largest residual accepted by `load` (elements): refuses absurd lengths from a corrupt
/// file before allocating.
const MAX_LOAD_LEN: u64 = 1 << 40;

impl Compressor {
    /// A compressor with no residuals and zero counters.
    ///
    /// Fails if a [`ScalePolicy::Factor`] is not finite and positive.
    pub fn new(format: WireFormat, scale: ScalePolicy, error_feedback: bool) -> Result<Self> {
        if let ScalePolicy::Factor(f) = scale {
            if !(f.is_finite() && f > 0.0) {
                return Err(Error::invalid(
                    "Compressor::new",
                    format!("scale factor must be finite and > 0, got {f}"),
                ));
            }
        }
        Ok(Compressor {
            format,
            scale,
            error_feedback,
            residuals: BTreeMap::new(),
            total: OverflowStats::default(),
            pending: OverflowStats::default(),
            collectives: 0,
        })
    }

    /// The wire format.
    pub fn format(&self) -> WireFormat {
        self.format
    }

    /// Whether residuals are kept.
    pub fn error_feedback(&self) -> bool {
        self.error_feedback
    }

    /// The factor applied before the cast for a world of `world_size` ranks.
    pub fn scale(&self, world_size: usize) -> Result<f32> {
        match self.scale {
            ScalePolicy::Factor(f) => Ok(f),
            ScalePolicy::InverseWorldSize if world_size > 0 => Ok(1.0 / world_size as f32),
            ScalePolicy::InverseWorldSize => {
                Err(Error::invalid("Compressor::scale", "world_size is 0"))
            }
        }
    }

    /// The residual of `buffer`, if it has one yet.
    pub fn residual(&self, buffer: u64) -> Option<&[f32]> {
        self.residuals.get(&buffer).map(|r| r.as_slice())
    }

    /// Forgets every residual (e.g. after the model was reset).
    pub fn clear_residuals(&mut self) {
        self.residuals.clear();
    }

    /// Counts since the last [`Compressor::finish_collective`].
    pub fn pending(&self) -> OverflowStats {
        self.pending
    }

    /// Counts over all finished collectives.
    pub fn total(&self) -> OverflowStats {
        self.total
    }

    /// Number of finished collectives.
    pub fn collectives(&self) -> u64 {
        self.collectives
    }

    /// Adds counts seen outside this object (the executor's compressing sends) to the
    /// current collective.
    pub fn add_pending(&mut self, s: OverflowStats) {
        self.pending += s;
    }

    /// Closes the books on one collective: returns its counts and adds them to
    /// [`Compressor::total`]. Logs a warning when anything was saturated or non-finite.
    pub fn finish_collective(&mut self) -> OverflowStats {
        let done = std::mem::take(&mut self.pending);
        self.total += done;
        self.collectives += 1;
        if !done.is_clean() {
            tracing::warn!(
                target: "hetccl::compression",
                collective = self.collectives,
                format = %self.format,
                overflow = done.overflow,
                nonfinite = done.nonfinite,
                "compression saturated or passed on non-finite values"
            );
        }
        done
    }

    fn residual_chunk(
        &mut self,
        op: &'static str,
        buffer: u64,
        offset: usize,
        len: usize,
    ) -> Result<Option<&mut [f32]>> {
        if !self.error_feedback {
            return Ok(None);
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::invalid(op, format!("offset {offset} + len {len} overflows")))?;
        let r = self.residuals.entry(buffer).or_default();
        if r.len() < end {
            r.resize(end, 0.0);
        }
        Ok(Some(&mut r[offset..end]))
    }

    /// Compresses `src` (chunk `offset..offset+src.len()` of `buffer`) into `dst`, which
    /// holds `2 * src.len()` bytes of the wire format (any alignment).
    pub fn compress(
        &mut self,
        buffer: u64,
        offset: usize,
        src: &[f32],
        world_size: usize,
        dst: &mut [u8],
    ) -> Result<OverflowStats> {
        const OP: &str = "Compressor::compress";
        check_wire_len(OP, dst.len(), src.len())?;
        let scale = self.scale(world_size)?;
        let format = self.format;
        let residual = self.residual_chunk(OP, buffer, offset, src.len())?;
        let stats = match format {
            WireFormat::F16 => {
                with_wire_mut::<f16, _>(dst, |d| super::compress(src, scale, residual, d))
            }
            WireFormat::Bf16 => {
                with_wire_mut::<bf16, _>(dst, |d| super::compress(src, scale, residual, d))
            }
        };
        self.pending += stats;
        Ok(stats)
    }

    /// The fused ring step on chunk `offset..offset+local.len()` of `buffer`: `dst` =
    /// wire(`incoming` + `local`·scale + residual). `incoming` and `dst` hold
    /// `2 * local.len()` bytes each, in separate buffers.
    ///
    /// In a ring reduce-scatter each element of a rank's buffer is compressed by that rank
    /// once per collective, either by [`Compressor::compress`] (the first send) or here, so
    /// one residual per element carries both kinds of rounding to the next collective.
    pub fn decompress_add_compress(
        &mut self,
        buffer: u64,
        offset: usize,
        incoming: &[u8],
        local: &[f32],
        world_size: usize,
        dst: &mut [u8],
    ) -> Result<OverflowStats> {
        const OP: &str = "Compressor::decompress_add_compress";
        check_wire_len(OP, incoming.len(), local.len())?;
        check_wire_len(OP, dst.len(), local.len())?;
        let scale = self.scale(world_size)?;
        let format = self.format;
        let residual = self.residual_chunk(OP, buffer, offset, local.len())?;
        let stats = match format {
            WireFormat::F16 => {
                let inc = wire_vec::<f16>(incoming);
                with_wire_mut::<f16, _>(dst, |d| {
                    super::decompress_add_compress(&inc, local, scale, residual, d)
                })
            }
            WireFormat::Bf16 => {
                let inc = wire_vec::<bf16>(incoming);
                with_wire_mut::<bf16, _>(dst, |d| {
                    super::decompress_add_compress(&inc, local, scale, residual, d)
                })
            }
        };
        self.pending += stats;
        Ok(stats)
    }

    /// `dst = f32(src)` for `src` holding `2 * dst.len()` wire bytes.
    pub fn decompress(&self, src: &[u8], dst: &mut [f32]) -> Result<()> {
        check_wire_len("Compressor::decompress", src.len(), dst.len())?;
        match self.format {
            WireFormat::F16 => super::decompress::<f16>(&wire_vec(src), dst),
            WireFormat::Bf16 => super::decompress::<bf16>(&wire_vec(src), dst),
        }
        Ok(())
    }

    /// `dst += f32(src)` for `src` holding `2 * dst.len()` wire bytes.
    pub fn decompress_add(&self, src: &[u8], dst: &mut [f32]) -> Result<()> {
        check_wire_len("Compressor::decompress_add", src.len(), dst.len())?;
        match self.format {
            WireFormat::F16 => super::decompress_add::<f16>(&wire_vec(src), dst),
            WireFormat::Bf16 => super::decompress_add::<bf16>(&wire_vec(src), dst),
        }
        Ok(())
    }

    /// Writes the whole state (little-endian, versioned, with a checksum).
    ///
    /// Layout: magic `HCCLCMPR`, u32 version, u8 format, u8 scale tag (0 = 1/world,
    /// 1 = factor), u32 factor bits, u8 error feedback, u64 × 5 (total overflow, total
    /// nonfinite, pending overflow, pending nonfinite, collectives), u64 buffer count, then
    /// per buffer u64 id, u64 len, len × f32; finally the u64 FNV-1a of all the above.
    pub fn save(&self, w: impl Write) -> Result<()> {
        let mut w = Fnv::new(w);
        let (tag, factor) = match self.scale {
            ScalePolicy::InverseWorldSize => (0u8, 0.0f32),
            ScalePolicy::Factor(f) => (1u8, f),
        };
        let res = (|| -> std::io::Result<()> {
            w.write_all(MAGIC)?;
            w.write_all(&VERSION.to_le_bytes())?;
            w.write_all(&[self.format as u8, tag])?;
            w.write_all(&factor.to_bits().to_le_bytes())?;
            w.write_all(&[self.error_feedback as u8])?;
            for v in [
                self.total.overflow,
                self.total.nonfinite,
                self.pending.overflow,
                self.pending.nonfinite,
                self.collectives,
                self.residuals.len() as u64,
            ] {
                w.write_all(&v.to_le_bytes())?;
            }
            for (id, r) in &self.residuals {
                w.write_all(&id.to_le_bytes())?;
                w.write_all(&(r.len() as u64).to_le_bytes())?;
                // The in-memory f32s are little-endian on every target we build for;
                // to_le_bytes per element keeps the format right elsewhere too.
                let mut bytes = Vec::with_capacity(r.len() * 4);
                for x in r {
                    bytes.extend_from_slice(&x.to_bits().to_le_bytes());
                }
                w.write_all(&bytes)?;
            }
            let sum = w.hash;
            w.inner.write_all(&sum.to_le_bytes())?;
            w.inner.flush()
        })();
        res.map_err(|e| Error::io("saving compressor state", e))
    }

    /// Reads what [`Compressor::save`] wrote. Refuses other versions, corrupt or truncated
    /// data with an [`Error::Io`] of kind `InvalidData` / `UnexpectedEof`.
    pub fn load(r: impl Read) -> Result<Compressor> {
        let mut r = Fnv::new(r);
        let ctx = "loading compressor state";
        let bad = |what: String| {
            Error::io(
                ctx,
                std::io::Error::new(std::io::ErrorKind::InvalidData, what),
            )
        };
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).map_err(|e| Error::io(ctx, e))?;
        if &magic != MAGIC {
            return Err(bad(format!("bad magic {magic:02x?}")));
        }
        let version = read_u32(&mut r).map_err(|e| Error::io(ctx, e))?;
        if version != VERSION {
            return Err(bad(format!(
                "version {version}, this build reads {VERSION}"
            )));
        }
        let mut b = [0u8; 2];
        r.read_exact(&mut b).map_err(|e| Error::io(ctx, e))?;
        let format =
            WireFormat::from_u8(b[0]).ok_or_else(|| bad(format!("format tag {}", b[0])))?;
        let factor = f32::from_bits(read_u32(&mut r).map_err(|e| Error::io(ctx, e))?);
        let scale = match b[1] {
            0 => ScalePolicy::InverseWorldSize,
            1 => ScalePolicy::Factor(factor),
            t => return Err(bad(format!("scale tag {t}"))),
        };
        let mut ef = [0u8; 1];
        r.read_exact(&mut ef).map_err(|e| Error::io(ctx, e))?;
        let mut c = Compressor::new(format, scale, ef[0] != 0)?;
        let mut u = [0u64; 6];
        for x in u.iter_mut() {
            *x = read_u64(&mut r).map_err(|e| Error::io(ctx, e))?;
        }
        c.total = OverflowStats {
            overflow: u[0],
            nonfinite: u[1],
        };
        c.pending = OverflowStats {
            overflow: u[2],
            nonfinite: u[3],
        };
        c.collectives = u[4];
        for _ in 0..u[5] {
            let id = read_u64(&mut r).map_err(|e| Error::io(ctx, e))?;
            let len = read_u64(&mut r).map_err(|e| Error::io(ctx, e))?;
            if len > MAX_LOAD_LEN {
                return Err(bad(format!("buffer {id}: length {len} is implausible")));
            }
            let mut bytes = vec![0u8; len as usize * 4];
            r.read_exact(&mut bytes).map_err(|e| Error::io(ctx, e))?;
            let v = bytes
                .chunks_exact(4)
                .map(|q| f32::from_bits(u32::from_le_bytes([q[0], q[1], q[2], q[3]])))
                .collect();
            if c.residuals.insert(id, v).is_some() {
                return Err(bad(format!("buffer {id} appears twice")));
            }
        }
        let want = r.hash;
        let mut s = [0u8; 8];
        r.inner.read_exact(&mut s).map_err(|e| Error::io(ctx, e))?;
        let got = u64::from_le_bytes(s);
        if got != want {
            return Err(bad(format!(
                "checksum {got:016x}, content hashes to {want:016x}"
            )));
        }
        Ok(c)
    }
}

fn check_wire_len(op: &'static str, bytes: usize, elems: usize) -> Result<()> {
    if Some(bytes) == elems.checked_mul(2) {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!("{bytes} wire bytes for {elems} f32 values (want 2 per value)"),
        ))
    }
}

/// Wire bytes as typed values, copied only when misaligned for u16 (transport buffers
/// promise no alignment).
fn wire_vec<W: WireFloat>(bytes: &[u8]) -> Cow<'_, [W]> {
    match bytemuck::try_cast_slice::<u8, W>(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}

/// Runs `f` on `bytes` viewed as wire values, through an aligned copy if they are not.
fn with_wire_mut<W: WireFloat, R>(bytes: &mut [u8], f: impl FnOnce(&mut [W]) -> R) -> R {
    match bytemuck::try_cast_slice_mut::<u8, W>(bytes) {
        Ok(s) => f(s),
        Err(_) => {
            let mut tmp: Vec<W> = bytemuck::pod_collect_to_vec(bytes);
            let out = f(&mut tmp);
            bytes.copy_from_slice(bytemuck::cast_slice(&tmp));
            out
        }
    }
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// FNV-1a over everything read or written through it.
struct Fnv<T> {
    inner: T,
    hash: u64,
}

impl<T> Fnv<T> {
    fn new(inner: T) -> Self {
        Fnv {
            inner,
            hash: 0xcbf2_9ce4_8422_2325,
        }
    }
    fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.hash = (self.hash ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

impl<T: Write> Write for Fnv<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Read> Read for Fnv<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(step: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + step * 13) % 101) as f32 * 0.0137 - 0.6)
            .collect()
    }

    /// One ring-like step: compress chunk 0, fuse chunk 1 with a fixed incoming value.
    fn step(c: &mut Compressor, s: usize, out: &mut Vec<u8>) {
        let g = gradient(s, 64);
        let mut wire = vec![0u8; 64];
        c.compress(7, 0, &g[..32], 4, &mut wire).unwrap();
        out.extend_from_slice(&wire);
        let incoming: Vec<u8> = bytemuck::cast_slice(&[f16::from_f32(0.3); 32]).to_vec();
        c.decompress_add_compress(7, 32, &incoming, &g[32..], 4, &mut wire)
            .unwrap();
        out.extend_from_slice(&wire);
        c.finish_collective();
    }

    #[test]
    fn save_and_load_continue_bitwise() {
        for format in [WireFormat::F16, WireFormat::Bf16] {
            let mut a = Compressor::new(format, ScalePolicy::InverseWorldSize, true).unwrap();
            let mut sink = Vec::new();
            for s in 0..10 {
                step(&mut a, s, &mut sink);
            }
            let mut saved = Vec::new();
            a.save(&mut saved).unwrap();
            let mut b = Compressor::load(saved.as_slice()).unwrap();
            assert_eq!(a, b);
            assert_eq!(b.residual(7).map(|r| r.len()), Some(64));
            let (mut wa, mut wb) = (Vec::new(), Vec::new());
            for s in 10..20 {
                step(&mut a, s, &mut wa);
                step(&mut b, s, &mut wb);
            }
            assert_eq!(wa, wb, "{format}");
            assert_eq!(a, b);
            assert_eq!(b.collectives(), 20);
            // Residuals are live: something was actually carried.
            assert!(b.residual(7).unwrap().iter().any(|&r| r != 0.0));
        }
    }

    #[test]
    fn load_refuses_corrupt_data() {
        let mut c = Compressor::new(WireFormat::F16, ScalePolicy::Factor(0.5), true).unwrap();
        let mut wire = vec![0u8; 6];
        c.compress(1, 0, &[1.0, 2.0, 1e-3], 1, &mut wire).unwrap();
        let mut saved = Vec::new();
        c.save(&mut saved).unwrap();
        // header 8+4+2+4+1 + 6×8, buffer header 16, 3 residuals, checksum 8
        assert_eq!(saved.len(), 19 + 48 + 16 + 12 + 8);
        assert_eq!(Compressor::load(saved.as_slice()).unwrap(), c);

        let mut flipped = saved.clone();
        flipped[19 + 48 + 16] ^= 1;
        let e = Compressor::load(flipped.as_slice())
            .unwrap_err()
            .to_string();
        assert!(e.contains("checksum"), "{e}");

        let e = Compressor::load(&saved[..saved.len() - 3]).unwrap_err();
        match e {
            Error::Io { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof)
            }
            other => panic!("{other}"),
        }

        let mut magic = saved.clone();
        magic[0] = b'X';
        let e = Compressor::load(magic.as_slice()).unwrap_err().to_string();
        assert!(e.contains("bad magic"), "{e}");
    }

    #[test]
    fn counters_accumulate_per_collective() {
        let mut c = Compressor::new(WireFormat::F16, ScalePolicy::Factor(1.0), false).unwrap();
        let mut wire = vec![0u8; 8];
        c.compress(0, 0, &[1.0, 1e5, f32::NAN, -1e6], 2, &mut wire)
            .unwrap();
        c.compress(0, 0, &[1.0, 1.0, 1.0, 7e4], 2, &mut wire)
            .unwrap();
        assert_eq!(
            c.pending(),
            OverflowStats {
                overflow: 3,
                nonfinite: 1
            }
        );
        assert_eq!(
            c.finish_collective(),
            OverflowStats {
                overflow: 3,
                nonfinite: 1
            }
        );
        c.compress(0, 0, &[1.0, 2.0, 3.0, 4.0], 2, &mut wire)
            .unwrap();
        assert_eq!(c.finish_collective(), OverflowStats::default());
        assert_eq!(
            c.total(),
            OverflowStats {
                overflow: 3,
                nonfinite: 1
            }
        );
        assert_eq!(c.collectives(), 2);
        // Without error feedback no residual is kept.
        assert_eq!(c.residual(0), None);
    }

    #[test]
    fn scale_policy_and_argument_checks() {
        let c = Compressor::new(WireFormat::Bf16, ScalePolicy::InverseWorldSize, true).unwrap();
        assert_eq!(c.scale(4).unwrap(), 0.25);
        assert!(c.scale(0).is_err());
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(Compressor::new(WireFormat::F16, ScalePolicy::Factor(bad), true).is_err());
        }
        let mut c = c;
        let mut wire = vec![0u8; 5];
        let e = c
            .compress(0, 0, &[1.0, 2.0, 3.0], 1, &mut wire)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid argument to Compressor::compress: 5 wire bytes for 3 f32 values (want 2 per value)"
        );
    }

    #[test]
    fn misaligned_wire_bytes_give_the_same_result() {
        let mut a = Compressor::new(WireFormat::F16, ScalePolicy::InverseWorldSize, true).unwrap();
        let mut b = a.clone();
        let g = gradient(0, 33);
        let mut aligned = vec![0u16; 33];
        let mut raw = [0u8; 67];
        a.compress(0, 0, &g, 3, bytemuck::cast_slice_mut(&mut aligned))
            .unwrap();
        b.compress(0, 0, &g, 3, &mut raw[1..]).unwrap();
        assert_eq!(bytemuck::cast_slice::<u16, u8>(&aligned), &raw[1..]);
        let mut back = vec![0.0f32; 33];
        b.decompress(&raw[1..], &mut back).unwrap();
        assert_eq!(back[5], f16::from_bits(aligned[5]).to_f32());
        assert_eq!(a, b);
    }
}
