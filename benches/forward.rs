//! Criterion benchmark of an encoder forward: ViT-B/16 at 224 px, batch 8 (the number the
//! `distillery bench` verb also reports), and the fused CPU kernels on ViT-B-sized tensors.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use distillery::bench::{random_vit, VitSize};
use distillery::models::{FeatureRequest, LoadOptions};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn forward(c: &mut Criterion) {
    let (_dir, enc) =
        random_vit(VitSize::BASE16, &LoadOptions::default()).expect("random ViT-B/16");
    let x = Tensor::randn(0f32, 1f32, (8, 3, 224, 224), &Device::Cpu).expect("input");
    let mut g = c.benchmark_group("vit_b16_224");
    g.sample_size(10);
    g.bench_function("forward_batch8", |b| {
        b.iter(|| {
            enc.forward_features(&x, &FeatureRequest::last_only())
                .expect("forward")
        })
    });
    g.finish();
}

fn kernels(c: &mut Criterion) {
    let d = Device::Cpu;
    let h = Tensor::randn(0f32, 1f32, (8, 197, 3072), &d).expect("h");
    let qkv = Tensor::randn(0f32, 1f32, (8, 197, 2304), &d).expect("qkv");
    let w = Tensor::randn(0f32, 0.02f32, (768, 3072), &d).expect("w");
    let bias = Tensor::zeros(768, candle_core::DType::F32, &d).expect("b");
    let mut g = c.benchmark_group("kernels");
    g.sample_size(20);
    g.bench_function("gelu_8x197x3072", |b| {
        b.iter(|| distillery::kernels::gelu_erf(&h).expect("gelu"))
    });
    g.bench_function("attention_8x197x12h", |b| {
        b.iter(|| distillery::kernels::attention(&qkv, 12, 0.125).expect("attention"))
    });
    // a ViT-S/16 student's attention at batch 8, forward and backward (training)
    let qkv_s = candle_core::Var::randn(0f32, 1f32, (8, 197, 1152), &d).expect("qkv");
    let up = Tensor::randn(0f32, 1f32, (8, 197, 384), &d).expect("upstream");
    g.bench_function("attention_fwd_bwd_8x197x6h", |b| {
        b.iter(|| {
            let y = distillery::kernels::attention(qkv_s.as_tensor(), 6, 0.125).expect("attention");
            (y * &up)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("backward")
        })
    });
    g.bench_function("linear_fc2_1576x3072x768", |b| {
        b.iter(|| distillery::kernels::linear(&h, &w, Some(&bias)).expect("linear"))
    });
    // the same weight stored input-major, as a frozen model keeps it
    let w_in = distillery::kernels::input_major(&w).expect("input-major");
    g.bench_function("linear_fc2_1576x3072x768_input_major", |b| {
        b.iter(|| distillery::kernels::linear(&h, &w_in, Some(&bias)).expect("linear"))
    });
    g.finish();
}

criterion_group!(benches, forward, kernels);
criterion_main!(benches);
