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
    let reason = if detail.contains("CUDA_ERROR_STUB_LIBRARY") {
        "libcuda.so.1 is the toolkit's stub, not an NVIDIA driver (no driver on this machine)"
    } else if detail.contains("CUDA_ERROR_NO_DEVICE") {
        "the NVIDIA driver sees no GPU"
    } else if detail.contains("CUDA_ERROR_INVALID_DEVICE") {
        return format!(
            "there is no GPU with ordinal {ordinal} ({})",
            one_line(&detail)
        );
    } else if detail.contains("CUDA_ERROR_INSUFFICIENT_DRIVER") {
        "the NVIDIA driver is older than the CUDA version this build needs"
    } else {
        return format!("cannot open cuda:{ordinal}: {}", one_line(&detail));
    };
    format!("{reason} ({})", one_line(&detail))
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
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
