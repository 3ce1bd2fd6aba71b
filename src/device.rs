//! Choosing the compute device, and which code path runs on it.
//!
//! `--device cuda:N` either opens a usable GPU or fails with one line naming why not (a build
//! without CUDA, a driver stub, no device, a missing ordinal). On the CPU, f32 work runs on the
//! fused multi-threaded kernels; `SPEECHCACHE_CPU_KERNELS=off` (or [`force_tensor_ops`] in
//! tests) sends it through the plain tensor-op paths that CUDA and f16/bf16 use instead, so
//! those paths are tested on machines without a GPU.
use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::Device;

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

thread_local! {
    static FORCED_TENSOR_OPS: Cell<bool> = const { Cell::new(false) };
}

/// Whether work on `device` may take the fused CPU kernels: the CPU, unless they are turned off
/// by `SPEECHCACHE_CPU_KERNELS=off` or, on this thread, by [`force_tensor_ops`].
pub fn cpu_kernels(device: &Device) -> bool {
    static DISABLED: OnceLock<bool> = OnceLock::new();
    let disabled = *DISABLED.get_or_init(|| {
        std::env::var("SPEECHCACHE_CPU_KERNELS").is_ok_and(|v| v.eq_ignore_ascii_case("off"))
    });
    device.is_cpu() && !disabled && !FORCED_TENSOR_OPS.with(Cell::get)
}

/// Until the guard drops, code on this thread takes the tensor-op paths (as on CUDA) on the CPU.
pub fn force_tensor_ops() -> TensorOpsGuard {
    TensorOpsGuard {
        previous: FORCED_TENSOR_OPS.with(|f| f.replace(true)),
    }
}

/// Restores the previous choice of [`force_tensor_ops`] when dropped.
pub struct TensorOpsGuard {
    previous: bool,
}

impl Drop for TensorOpsGuard {
    fn drop(&mut self) {
        FORCED_TENSOR_OPS.with(|f| f.set(self.previous));
    }
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
    fn force_tensor_ops_is_scoped_to_the_guard() {
        assert!(cpu_kernels(&Device::Cpu) || std::env::var("SPEECHCACHE_CPU_KERNELS").is_ok());
        let before = cpu_kernels(&Device::Cpu);
        {
            let _g = force_tensor_ops();
            assert!(!cpu_kernels(&Device::Cpu));
            let _inner = force_tensor_ops();
        }
        assert_eq!(cpu_kernels(&Device::Cpu), before);
    }
}
