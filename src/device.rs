//! Choosing the compute device, and which code path runs on it.
//!
//! `--device cuda:N` either opens a usable GPU or fails with one line naming why not (a build
//! without CUDA, a driver stub, no device, a missing ordinal). [`Backend`] is the whole choice
//! of device, compute dtype and executor, made once at the CLI: on the CPU, f32 work runs on
//! the CPU engine; `SPEECHCACHE_ENGINE=candle` (or [`Backend::tensor_ops`] in tests) sends it
//! through the candle tensor ops that CUDA and f16/bf16 use instead, so those paths are tested
//! on machines without a GPU.
use std::sync::OnceLock;

use candle_core::{DType, Device};

/// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`, opened; the error says why no GPU is usable.
pub fn open(text: &str) -> anyhow::Result<Device> {
    let text = text.trim();
    if text == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match text.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => anyhow::bail!("invalid --device {text:?}: use cpu, cuda or cuda:N"),
        },
        None => anyhow::bail!("invalid --device {text:?}: use cpu, cuda or cuda:N"),
    };
    Device::new_cuda(ordinal).map_err(|e| {
        anyhow::anyhow!(
            "--device {text}: no usable GPU: {}",
            no_gpu_reason(&e, ordinal)
        )
    })
}

/// Why `Device::new_cuda` failed, in words a user can act on.
fn no_gpu_reason(err: &candle_core::Error, ordinal: usize) -> String {
    if matches!(err, candle_core::Error::NotCompiledWithCudaSupport) {
        return "this speechcache was built without CUDA (rebuild with `cargo build --release \
                --features cuda`, see README)"
            .into();
    }
    let detail = err.to_string();
    // The driver's error name, without the backtrace candle appends under RUST_BACKTRACE.
    let name = detail
        .find("CUDA_ERROR_")
        .map(|at| {
            let rest = &detail[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_uppercase() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .unwrap_or_else(|| detail.lines().next().unwrap_or("").trim());
    let reason = match name {
        "CUDA_ERROR_STUB_LIBRARY" => {
            "libcuda.so.1 is the toolkit's stub, not an NVIDIA driver (no driver on this machine)"
                .to_string()
        }
        "CUDA_ERROR_NO_DEVICE" => "the NVIDIA driver sees no GPU".to_string(),
        "CUDA_ERROR_INVALID_DEVICE" => format!("there is no GPU with ordinal {ordinal}"),
        "CUDA_ERROR_INSUFFICIENT_DRIVER" => {
            "the NVIDIA driver is older than the CUDA version this build needs".to_string()
        }
        _ => format!("cannot open cuda:{ordinal}"),
    };
    format!("{reason} ({name})")
}

/// Which code computes a model: the two executors every model has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executor {
    /// speechcache's own multi-threaded f32 kernels (`src/ops/`), CPU only: the SSL encoder's
    /// `models::ssl::CpuEncoder` and the Conformer's `models::asr::cpu::CpuEngine` (training,
    /// validation and decode alike).
    CpuEngine,
    /// candle tensor ops, on any device and dtype (CUDA, f16, bf16), with candle's autograd
    /// for training.
    TensorOps,
}

impl Executor {
    pub fn name(self) -> &'static str {
        match self {
            Executor::CpuEngine => "cpu-engine",
            Executor::TensorOps => "candle",
        }
    }
}

/// Where and how a stage computes: the device, the compute dtype, and which executor runs.
///
/// Resolved once at the CLI ([`Backend::resolve`]) from `--device`, the stage's compute dtype
/// and the environment, and passed down to extract, finetune, validation and decode. This is
/// the only place that reads the environment variables that pick an executor:
///
/// | variable | effect |
/// |---|---|
/// | `SPEECHCACHE_ENGINE=candle` | candle tensor ops even for f32 on the CPU (the path CUDA and f16/bf16 take), for extract and finetune alike |
/// | `SPEECHCACHE_CPU_KERNELS=off` | the same (older name) |
#[derive(Debug, Clone)]
pub struct Backend {
    device: Device,
    dtype: DType,
    executor: Executor,
    /// Tensor ops asked for (environment or [`Backend::tensor_ops`]), kept for `with_dtype`.
    tensor_ops: bool,
}

impl Backend {
    /// From the CLI: `--device` text (see [`open`]) and the compute dtype; the executor is the
    /// CPU engine for f32 on the CPU unless the environment asks for candle tensor ops.
    pub fn resolve(device: &str, dtype: DType) -> anyhow::Result<Self> {
        let device = open(device)?;
        Ok(Self::on(device, dtype, tensor_ops_requested()?))
    }

    /// For an already opened device, with the environment's choice of executor.
    pub fn new(device: Device, dtype: DType) -> anyhow::Result<Self> {
        Ok(Self::on(device, dtype, tensor_ops_requested()?))
    }

    /// candle tensor ops on `device` whatever the environment says: the path CUDA and
    /// f16/bf16 take, run on the CPU by tests and comparisons.
    pub fn tensor_ops(device: Device, dtype: DType) -> Self {
        Self::on(device, dtype, true)
    }

    fn on(device: Device, dtype: DType, tensor_ops: bool) -> Self {
        let executor = if device.is_cpu() && dtype == DType::F32 && !tensor_ops {
            Executor::CpuEngine
        } else {
            Executor::TensorOps
        };
        Self {
            device,
            dtype,
            executor,
            tensor_ops,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype models compute in (activations and weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn executor(&self) -> Executor {
        self.executor
    }

    pub fn uses_cpu_engine(&self) -> bool {
        self.executor == Executor::CpuEngine
    }

    /// The same device and executor choice for another dtype (f32 training beside an f16
    /// extract, say).
    pub fn with_dtype(&self, dtype: DType) -> Self {
        Self::on(self.device.clone(), dtype, self.tensor_ops)
    }
}

/// Whether the environment asks for candle tensor ops on the CPU; read once per process.
fn tensor_ops_requested() -> anyhow::Result<bool> {
    static CHOICE: OnceLock<Result<bool, String>> = OnceLock::new();
    CHOICE
        .get_or_init(|| {
            let engine = std::env::var("SPEECHCACHE_ENGINE").ok();
            let kernels = std::env::var("SPEECHCACHE_CPU_KERNELS").ok();
            let by_engine = match engine.as_deref().map(str::trim) {
                None | Some("") | Some("auto") | Some("cpu-engine") | Some("cpu") => false,
                Some("candle") => true,
                Some(other) => {
                    return Err(format!(
                        "SPEECHCACHE_ENGINE={other:?}: use auto, cpu-engine (or cpu) or candle"
                    ))
                }
            };
            let by_kernels = kernels.is_some_and(|v| v.trim().eq_ignore_ascii_case("off"));
            Ok(by_engine || by_kernels)
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_errors_become_one_short_reason() {
        let stub = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_STUB_LIBRARY, \"x\")\n   0: candle_core::error::Error::bt\n   1: main"
                .into(),
        );
        assert_eq!(
            no_gpu_reason(&stub, 0),
            "libcuda.so.1 is the toolkit's stub, not an NVIDIA driver (no driver on this machine) \
             (CUDA_ERROR_STUB_LIBRARY)"
        );
        let ordinal =
            candle_core::Error::Msg("DriverError(CUDA_ERROR_INVALID_DEVICE, \"\")".into());
        assert_eq!(
            no_gpu_reason(&ordinal, 3),
            "there is no GPU with ordinal 3 (CUDA_ERROR_INVALID_DEVICE)"
        );
        let other = candle_core::Error::Msg("out of luck\n   0: bt".into());
        assert_eq!(no_gpu_reason(&other, 1), "cannot open cuda:1 (out of luck)");
    }

    #[test]
    fn device_names_are_checked() {
        assert!(open("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda:", "cuda:x", "cuda1"] {
            let err = open(bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid --device"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_cpu_engine_runs_only_f32_on_the_cpu() {
        let forced = Backend::tensor_ops(Device::Cpu, DType::F32);
        assert_eq!(forced.executor(), Executor::TensorOps);
        for dtype in [DType::F16, DType::BF16] {
            assert_eq!(
                Backend::new(Device::Cpu, dtype).unwrap().executor(),
                Executor::TensorOps
            );
        }
        let default = Backend::new(Device::Cpu, DType::F32).unwrap();
        if std::env::var_os("SPEECHCACHE_ENGINE").is_none()
            && std::env::var_os("SPEECHCACHE_CPU_KERNELS").is_none()
        {
            assert_eq!(default.executor(), Executor::CpuEngine);
        }
        assert_eq!(
            default.with_dtype(DType::F16).executor(),
            Executor::TensorOps
        );
        assert_eq!(
            forced
                .with_dtype(DType::F16)
                .with_dtype(DType::F32)
                .executor(),
            Executor::TensorOps
        );
    }
}
