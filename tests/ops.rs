//! The training engine's own kernels against PyTorch, op by op (fixtures from
//! `tests/fixtures/ops/gen_*.py`, torch 2.5.1).
use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use speechcache::ops::winograd;

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ops")
        .join(name);
    candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture loads")
}

fn vec(t: &HashMap<String, Tensor>, key: &str) -> Vec<f32> {
    t[key].flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Largest error relative to the largest reference magnitude.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    err / scale.max(1e-30)
}

#[test]
fn winograd_conv3x3_matches_torch_forward_and_gradients() {
    let t = fixture("conv3x3.safetensors");
    for name in ["small", "even", "ssl"] {
        let x = &t[&format!("{name}.x")];
        let (rows, cols, c_in) = x.dims3().unwrap();
        let c_out = t[&format!("{name}.w")].dims()[0];
        let geo = winograd::Geometry {
            rows,
            cols,
            c_in,
            c_out,
            out_rows: rows - 2,
        };
        let (x, w) = (vec(&t, &format!("{name}.x")), vec(&t, &format!("{name}.w")));
        let u = winograd::transform_filter(&w, c_out, c_in);
        let mut y = vec![0f32; (rows - 2) * (cols - 2) * c_out];
        winograd::forward(&x, geo, &u, &mut y);
        let dy = vec(&t, &format!("{name}.dy"));
        let mut acc = vec![0f32; 16 * c_out * c_in];
        let mut dx = vec![0f32; x.len()];
        winograd::backward(&x, geo, &u, &dy, &mut acc, Some(&mut dx));
        let mut dw = vec![0f32; w.len()];
        winograd::add_filter_grad(&acc, c_out, c_in, &mut dw);
        for (what, got, want) in [
            ("output", &y, vec(&t, &format!("{name}.y"))),
            ("input gradient", &dx, vec(&t, &format!("{name}.dx"))),
            ("weight gradient", &dw, vec(&t, &format!("{name}.dw"))),
        ] {
            let e = rel_err(got, &want);
            println!("{name} {what}: {e:.2e} of the largest value");
            assert!(e < 1e-5, "{name} {what}: {e:.2e}");
        }
    }
}
