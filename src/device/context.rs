//! Device, stream and the embedded kernel module: the layer between the driver calls
//! (`driver.rs`) and the typed launchers (`kernels.rs`).
//! Kernels are looked up by their [`Signature`] key in a table filled when the module is
//! loaded, and launched through cudarc's launch builder by one prologue,
//! [`Stream::launch`].

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchConfig, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::driver::{self, device_error, DeviceAddr, MISSING_ENTRY};
use super::kernels::{KernelArgs, Signature, KERNELS};
use crate::compression::OverflowStats;
use crate::error::{Error, Result};

/// Every kernel of `kernels/*.cu`: the fatbin of build.rs (sm_75 to sm_90 machine code and
/// compute_90 PTX), or with `cuda12` the compute_70 PTX that NVRTC made, NUL-terminated.
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kernels.fatbin"));

/// Threads per block for every kernel (the kernels' `__launch_bounds__`).
const BLOCK: u32 = 256;

/// The loaded fatbin's kernels, by [`Signature::index`].
pub(super) struct Module {
    /// (function, blocks of `BLOCK` threads resident per SM); each function holds the
    /// module loaded, which cudarc unloads when the last one goes.
    funcs: Vec<(CudaFunction, u32)>,
    /// The module itself, for the kernels of the fatbin that are not the library's own
    /// (the trainer's `kernels/bert*.cu`), found by name through [`Device::function`].
    module: Arc<CudaModule>,
}

impl Module {
    fn load(ctx: &Arc<CudaContext>) -> Result<Module> {
        const OP: &str = "load the embedded kernels";
        // The driver parses the fatbin header with 8-byte loads; include_bytes! promises
        // only byte alignment, so it gets a copy from the allocator, which aligns buffers
        // of this size to 16 bytes (checked, as no Rust type promises it).
        let image = FATBIN.to_vec();
        if image.as_ptr() as usize % 8 != 0 {
            return Err(Error::Device {
                op: OP.to_string(),
                detail: format!(
                    "the copy of the {}-byte fatbin is not 8-byte aligned (at {:p}); the \
                     global allocator must align large buffers to 8 bytes",
                    image.len(),
                    image.as_ptr()
                ),
            });
        }
        // cuModuleLoadData takes cubin, PTX or a fatbin alike; cudarc calls every image a Ptx.
        let module = ctx
            .load_module(Ptx::from_binary(image))
            .map_err(device_error(OP))?;
        let mut funcs = Vec::with_capacity(KERNELS.len());
        for name in KERNELS {
            let f = module
                .load_function(name)
                .map_err(device_error(format!("find kernel {name}")))?;
            // Grids are sized to exactly one resident wave: grid-stride loops then give every
            // block the same work and no second, partly idle wave trails behind.
            let per_sm = f
                .occupancy_max_active_blocks_per_multiprocessor(BLOCK, 0, None)
                .map_err(device_error(format!("occupancy of {name}")))?;
            funcs.push((f, per_sm.max(1)));
        }
        Ok(Module { funcs, module })
    }

    fn function(&self, index: usize) -> Result<&(CudaFunction, u32)> {
        self.funcs.get(index).ok_or_else(|| Error::Device {
            op: format!("launch kernel #{index}"),
            detail: "no such kernel in the embedded module".to_string(),
        })
    }
}

/// One GPU with the hetccl kernels loaded.
pub struct Device {
    ctx: Arc<CudaContext>,
    module: Arc<Module>,
    name: String,
    compute_capability: (i32, i32),
    sm_count: u32,
}

impl Device {
    /// Opens device `ordinal` (its primary context) and loads the embedded kernels.
    pub fn open(ordinal: usize) -> Result<Device> {
        let op = format!("open device {ordinal}");
        let count = driver::device_count().map_err(|detail| Error::Device {
            op: op.clone(),
            detail,
        })?;
        if ordinal >= count {
            return Err(Error::Device {
                op,
                detail: format!("only {count} device(s) visible"),
            });
        }
        match catch_unwind(AssertUnwindSafe(|| Self::open_checked(ordinal, &op))) {
            Ok(r) => r,
            Err(_) => Err(Error::Device {
                op,
                detail: MISSING_ENTRY.to_string(),
            }),
        }
    }

    fn open_checked(ordinal: usize, op: &str) -> Result<Device> {
        let ctx = CudaContext::new(ordinal).map_err(device_error(op))?;
        let name = ctx.name().map_err(device_error(op))?;
        let compute_capability = ctx.compute_capability().map_err(device_error(op))?;
        let sm_count = driver::multiprocessor_count(&ctx).map_err(device_error(op))?;
        let module = Arc::new(Module::load(&ctx)?);
        tracing::info!(
            target: "hetccl::device",
            ordinal,
            name = %name,
            sm = format!("{}.{}", compute_capability.0, compute_capability.1),
            sm_count,
            "opened device"
        );
        Ok(Device {
            ctx,
            module,
            name,
            compute_capability,
            sm_count: sm_count.max(1) as u32,
        })
    }

    /// A new stream with its own overflow counters.
    pub fn new_stream(&self) -> Result<Stream> {
        let inner = self
            .ctx
            .new_stream()
            .map_err(device_error("create stream"))?;
        let stats = inner
            .alloc_zeros::<u64>(2)
            .map_err(device_error("allocate overflow counters"))?;
        let stats_ptr = stats.device_ptr(&inner).0;
        Ok(Stream {
            inner,
            module: self.module.clone(),
            stats,
            stats_ptr,
            sm_count: self.sm_count,
        })
    }

    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// (major, minor) compute capability.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The cudarc context, for anything not wrapped here.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// A kernel of the embedded fatbin by its `extern "C"` name, for the kernels the
    /// library has no launcher for (the trainer's, `kernels/bert*.cu`); the caller
    /// launches it through cudarc's launch builder on a [`Stream::cuda`].
    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        self.module
            .module
            .load_function(name)
            .map_err(device_error(format!("find kernel {name}")))
    }
}

/// A CUDA stream on a [`Device`]. Launches and copies on it run in order; overflow counts
/// of the compressing kernels accumulate on the device until
/// [`Stream::take_overflow_stats`].
pub struct Stream {
    inner: Arc<CudaStream>,
    module: Arc<Module>,
    stats: CudaSlice<u64>,
    stats_ptr: DeviceAddr,
    sm_count: u32,
}

impl Stream {
    /// The cudarc stream, for anything not wrapped here.
    pub fn cuda(&self) -> &Arc<CudaStream> {
        &self.inner
    }

    /// A device buffer of `n` zeros.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.inner.alloc_zeros(n).map_err(device_error(format!(
            "allocate {} bytes",
            n * std::mem::size_of::<T>()
        )))
    }

    /// Copies `host` into a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.inner.clone_htod(host).map_err(device_error(format!(
            "upload {} bytes",
            std::mem::size_of_val(host)
        )))
    }

    /// Copies a device buffer back (waits for it).
    pub fn download<T: DeviceRepr>(&self, dev: &impl DevicePtr<T>) -> Result<Vec<T>> {
        self.inner
            .clone_dtoh(dev)
            .map_err(device_error(format!("download {} bytes", dev.num_bytes())))
    }

    /// Device-to-device copy of equal-length buffers.
    pub fn copy<T>(&self, src: &impl DevicePtr<T>, dst: &mut impl DevicePtrMut<T>) -> Result<()> {
        if src.len() != dst.len() {
            return Err(Error::invalid(
                "Stream::copy",
                format!("src has {} elements, dst {}", src.len(), dst.len()),
            ));
        }
        self.inner
            .memcpy_dtod(src, dst)
            .map_err(device_error(format!("copy {} bytes", src.num_bytes())))
    }

    /// Waits for everything issued so far.
    pub fn synchronize(&self) -> Result<()> {
        self.inner
            .synchronize()
            .map_err(device_error("synchronize stream"))
    }

    /// Waits for the stream, returns the overflow counts of the compressing kernels run
    /// since the last call, and resets them.
    pub fn take_overflow_stats(&mut self) -> Result<OverflowStats> {
        let v = self.download(&self.stats)?;
        self.inner
            .memset_zeros(&mut self.stats)
            .map_err(device_error("reset overflow counters"))?;
        Ok(OverflowStats {
            overflow: v.first().copied().unwrap_or(0),
            nonfinite: v.get(1).copied().unwrap_or(0),
        })
    }

    /// Runs `f` (which enqueues work on this stream) between two CUDA events and returns the
    /// elapsed device time in milliseconds. Waits for the end event.
    pub fn time(&self, f: impl FnOnce(&Stream) -> Result<()>) -> Result<f32> {
        let ctx = self.inner.context();
        let start = driver::timing_event(ctx).map_err(device_error("create event"))?;
        let end = driver::timing_event(ctx).map_err(device_error("create event"))?;
        start
            .record(&self.inner)
            .map_err(device_error("record event"))?;
        f(self)?;
        end.record(&self.inner)
            .map_err(device_error("record event"))?;
        start
            .elapsed_ms(&end)
            .map_err(device_error("read event timer"))
    }

    /// Device address of the two u64 overflow counters.
    pub(super) fn stats_ptr(&self) -> DeviceAddr {
        self.stats_ptr
    }

    /// The one launch prologue: launches the kernel `sig` names over `items` work items
    /// (one per thread per grid-stride step), with a grid capped at what the device holds
    /// resident at once, its arguments pushed in order through cudarc's launch builder.
    ///
    /// # Safety
    /// Every device address among `args` must cover what the kernel touches and stay
    /// valid until the stream has run it. (Their types and order are the kernel's by
    /// `Signature`.)
    pub(super) unsafe fn launch<S: Signature>(
        &self,
        sig: S,
        items: usize,
        args: S::Args,
    ) -> Result<()> {
        let (f, per_sm) = self.module.function(sig.index())?;
        let cap = (self.sm_count * per_sm) as usize;
        let blocks = items.div_ceil(BLOCK as usize).clamp(1, cap) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.inner.launch_builder(f);
        args.push(&mut launch);
        // SAFETY: the arguments are the kernel's parameter list (Signature); the caller
        // vouches for the memory behind the addresses among them. They are plain values,
        // so the builder adds no event waits: it binds the context and launches.
        unsafe { launch.launch(cfg) }
            .map(|_| ())
            .map_err(|e| device_error(format!("launch {}", sig.name()))(e))
    }
}
