#!/usr/bin/env python3
"""Generate tiny random checkpoints and reference outputs for distillery's parity tests.

Run by hand (never by CI):

    python -m venv .refenv && .refenv/bin/pip install torch transformers timm safetensors pillow
    .refenv/bin/python scripts/gen_fixtures.py

Writes, for every supported family:
  tests/fixtures/models/<name>/            config.json, model.safetensors[, preprocessor_config.json]
  tests/fixtures/refs/<name>-<case>.safetensors
      pixel_values [B,3,H,W] at a non-native input size, and the reference model's
      hidden_states.{i} / last_hidden_state exactly as transformers (or timm) return them.
and the embedded demo assets (assets/demo-model, assets/sample.png).

Weights are drawn at random with a fixed seed (not the libraries' init, which zeroes many
tensors such as SAM's position tables), so every parameter influences the outputs.
"""
import json
import os
import shutil
import sys

import torch
import torch.nn.functional as F
import transformers as T
from safetensors.torch import save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MODELS = os.path.join(ROOT, "tests", "fixtures", "models")
REFS = os.path.join(ROOT, "tests", "fixtures", "refs")


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 0:
                continue
            noise = torch.randn(p.shape, generator=g)
            if ("norm" in name or "layer_norm" in name or "layernorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "lambda1" in name or "gamma" in name:
                p.copy_(0.5 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.shape[-1]
                scale = max(fan_in, 1) ** -0.5 if p.dim() > 1 else 0.5
                p.copy_(noise * scale)
    model.eval()
    return model


def fresh(name):
    d = os.path.join(MODELS, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def pixels(b, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g)


def save_ref(name, case, x, hidden, last):
    os.makedirs(REFS, exist_ok=True)
    out = {"pixel_values": x.clone().contiguous()}
    for i, h in enumerate(hidden):
        out[f"hidden_states.{i}"] = h.clone().contiguous()
    out["last_hidden_state"] = last.clone().contiguous()
    save_file(out, os.path.join(REFS, f"{name}-{case}.safetensors"))
    shapes = {k: list(v.shape) for k, v in out.items() if k != "pixel_values"}
    print(f"  {name}-{case}: input {list(x.shape)} -> {len(hidden)} hidden states, last {shapes['last_hidden_state']}")


def hf_ref(name, model, cases, **kw):
    for case, x in cases.items():
        with torch.no_grad():
            o = model(pixel_values=x, output_hidden_states=True, **kw)
        save_ref(name, case, x, o.hidden_states, o.last_hidden_state)


def token_family(name, model, seed, cases, save_model=None, **kw):
    randomize(model, seed)
    d = fresh(name)
    (save_model or model).save_pretrained(d, safe_serialization=True)
    hf_ref(name, model, cases, **kw)


def main():
    torch.manual_seed(0)
    print("transformers", T.__version__, "torch", torch.__version__)
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2)

    # ViT: native 32 px / patch 8 (4x4 grid); test 40x56 (5x7, upsampling, non-square) and 24x16.
    vit = T.ViTModel(T.ViTConfig(intermediate_size=64, image_size=32, patch_size=8, **common), add_pooling_layer=False)
    token_family("vit", vit, 1, {"up": pixels(2, 40, 56, 11), "down": pixels(1, 24, 16, 12)},
                 interpolate_pos_encoding=True)

    # DINOv2: native 28 px / patch 7; plain bicubic resampling.
    dcfg = dict(image_size=28, patch_size=7, mlp_ratio=2, **common)
    dino = T.Dinov2Model(T.Dinov2Config(**dcfg))
    token_family("dinov2", dino, 2, {"up": pixels(2, 35, 49, 21), "down": pixels(1, 21, 14, 22)})

    # DINOv2-giant style: SwiGLU FFN.
    dino_g = T.Dinov2Model(T.Dinov2Config(use_swiglu_ffn=True, **dcfg))
    token_family("dinov2-swiglu", dino_g, 3, {"up": pixels(1, 42, 35, 31)})

    # DINOv2 with registers: antialiased bicubic resampling.
    dreg = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(num_register_tokens=4, **dcfg))
    token_family("dinov2-registers", dreg, 4, {"up": pixels(2, 35, 49, 41), "down": pixels(1, 21, 14, 42)})

    # CLIP: the full CLIPModel checkpoint layout people download (vision_config nested,
    # vision_model.* weights next to the text tower).
    vcfg = dict(intermediate_size=64, image_size=32, patch_size=8, **common)
    clip_full = T.CLIPModel(T.CLIPConfig(
        vision_config=vcfg,
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        projection_dim=8))
    randomize(clip_full, 5)
    d = fresh("clip")
    clip_full.save_pretrained(d, safe_serialization=True)
    T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    vision = T.CLIPVisionModel(T.CLIPVisionConfig(**vcfg))
    vision.load_state_dict({k[len("vision_model."):]: v for k, v in clip_full.state_dict().items() if k.startswith("vision_model.")}, strict=True)
    vision.eval()
    hf_ref("clip", vision, {"up": pixels(2, 40, 56, 51), "down": pixels(1, 24, 16, 52)}, interpolate_pos_encoding=True)

    # SigLIP vision tower (bare).
    sig = T.SiglipVisionModel(T.SiglipVisionConfig(**vcfg))
    token_family("siglip", sig, 6, {"up": pixels(2, 40, 56, 61), "down": pixels(1, 24, 16, 62)},
                 interpolate_pos_encoding=True)

    # SAM: full SamModel checkpoint (vision_encoder.*, prompt encoder, mask decoder), native
    # 64 px / patch 8 (8x8 grid), window 3 (so windows are padded), global blocks 1 and 3.
    svcfg = dict(hidden_size=32, output_channels=16, num_hidden_layers=4, num_attention_heads=2, mlp_dim=64,
                 image_size=64, patch_size=8, window_size=3, global_attn_indexes=[1, 3])
    sam_full = T.SamModel(T.SamConfig(
        vision_config=svcfg,
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16)))
    randomize(sam_full, 7)
    d = fresh("sam")
    sam_full.save_pretrained(d, safe_serialization=True)
    sd = {k[len("vision_encoder."):]: v for k, v in sam_full.state_dict().items() if k.startswith("vision_encoder.")}
    sam_ref(sd, svcfg, "native", 64, pixels(1, 3, 64, 64, ) if False else pixels(1, 64, 64, 71))
    sam_ref(sd, svcfg, "down", 48, pixels(2, 48, 48, 72))
    sam_ref(sd, svcfg, "up", 80, pixels(1, 80, 80, 73))

    timm_vit()
    student_sources()
    demo_assets()
    demo_distill_assets()
    full_size_manifests()
    embed_refs()


def sam_ref(sd, svcfg, case, size, x):
    """The reference SAM encoder cannot change input size; build it at `size` with the absolute
    table resampled as timm's samvit does (bicubic, antialiased) and the global blocks' relative
    tables resampled linearly as get_rel_pos does at run time."""
    grid = size // svcfg["patch_size"]
    cfg = dict(svcfg, image_size=size)
    sd = dict(sd)
    pe = sd["pos_embed"].permute(0, 3, 1, 2)
    sd["pos_embed"] = F.interpolate(pe, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True).permute(0, 2, 3, 1)
    for i in svcfg["global_attn_indexes"]:
        for ax in ("h", "w"):
            k = f"layers.{i}.attn.rel_pos_{ax}"
            t = sd[k]
            sd[k] = F.interpolate(t.t()[None], size=2 * grid - 1, mode="linear").reshape(-1, 2 * grid - 1).t()
    m = T.SamVisionModel(T.SamVisionConfig(**cfg))
    m.vision_encoder.load_state_dict(sd, strict=True)
    m.eval()
    hf_ref("sam", m, {case: x})


def timm_vit():
    import timm
    from timm.models import _hub

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, **args)
    randomize(m, 8)
    d = fresh("timm-vit")
    _hub.save_for_hf(m, d, model_args=args, safe_serialization=True)
    timm_refs(m, "timm-vit", {"up": pixels(2, 40, 56, 81), "down": pixels(1, 24, 16, 82)})


def timm_refs(m, name, cases):
    """Every block's output of a timm VisionTransformer (and the final norm), per input case."""
    for case, x in cases.items():
        with torch.no_grad():
            h = m.patch_embed(x)
            h = m._pos_embed(h)
            h = m.norm_pre(h)
            hs = [h]
            for blk in m.blocks:
                h = blk(h)
                hs.append(h)
            last = m.norm(h)
        save_ref(name, case, x, hs, last)


def student_sources():
    """ViT checkpoints whose MLP width is not 4x the width, to initialise students from:
    transformers naming (44 wide, MLP 96, no qkv bias) and timm naming (MLP ratio 3, no qkv bias,
    layer scale, 2 register tokens, position table without prefix rows). References at the
    native input: every block's output, against which the student's stem is compared."""
    import timm
    from timm.models import _hub

    vit = T.ViTModel(T.ViTConfig(hidden_size=44, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                 image_size=32, patch_size=8, qkv_bias=False, layer_norm_eps=1e-6),
                     add_pooling_layer=False)
    token_family("vit-mlp96", vit, 10, {"native": pixels(2, 32, 32, 101)})

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=3.0, qkv_bias=False,
                init_values=0.5, reg_tokens=2, class_token=True, no_embed_class=True, num_classes=0)
    m = timm.create_model("vit_base_patch16_224", pretrained=False, dynamic_img_size=True, **args)
    randomize(m, 11)
    m.eval()
    d = fresh("timm-vit-reg")
    _hub.save_for_hf(m, d, model_args=args, safe_serialization=True)
    timm_refs(m, "timm-vit-reg", {"native": pixels(2, 32, 32, 111), "up": pixels(1, 40, 56, 112)})


def full_size_manifests():
    """Real checkpoint configs (as published on the hub) with the exact tensor names and shapes
    transformers saves for them, built on the meta device (no weights). The Rust tests build
    every full-size model from these, proving the loader accepts the real layouts."""
    out = os.path.join(ROOT, "tests", "fixtures", "full-size")
    shutil.rmtree(out, ignore_errors=True)
    sam = lambda h, l, n, g: T.SamConfig(vision_config=dict(hidden_size=h, num_hidden_layers=l, num_attention_heads=n,
                                                                global_attn_indexes=g, mlp_dim=4 * h))
    dino = lambda h, l, n, **kw: dict(hidden_size=h, num_hidden_layers=l, num_attention_heads=n, image_size=518, patch_size=14, **kw)
    specs = {
        "sam-vit-base": (T.SamModel, sam(768, 12, 12, [2, 5, 8, 11])),
        "sam-vit-large": (T.SamModel, sam(1024, 24, 16, [5, 11, 17, 23])),
        "sam-vit-huge": (T.SamModel, sam(1280, 32, 16, [7, 15, 23, 31])),
        "dinov2-base": (T.Dinov2Model, T.Dinov2Config(**dino(768, 12, 12))),
        "dinov2-large": (T.Dinov2Model, T.Dinov2Config(**dino(1024, 24, 16))),
        "dinov2-giant": (T.Dinov2Model, T.Dinov2Config(**dino(1536, 40, 24, use_swiglu_ffn=True))),
        "dinov2-with-registers-giant": (T.Dinov2WithRegistersModel,
                                        T.Dinov2WithRegistersConfig(**dino(1536, 40, 24, use_swiglu_ffn=True, num_register_tokens=4))),
        "clip-vit-large-patch14-336": (T.CLIPModel, T.CLIPConfig(
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=336, patch_size=14),
            text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
            projection_dim=768)),
        "siglip-so400m-patch14-384": (T.SiglipModel, T.SiglipConfig(
            vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                               image_size=384, patch_size=14),
            text_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16))),
        "vit-base-patch16-224": (T.ViTModel, T.ViTConfig()),
    }
    import tempfile
    from safetensors import safe_open

    for name, (cls, cfg) in specs.items():
        # The names on disk are what save_pretrained writes (transformers 5 renames some
        # parameters in memory, e.g. DINOv2's attention, and maps them back when saving), so
        # save for real: uninitialised bf16 memory, read the headers, delete.
        with torch.device("meta"):
            m = cls(cfg)
        m = m.to_empty(device="cpu").to(torch.bfloat16)
        manifest = {}
        with tempfile.TemporaryDirectory() as tmp:
            m.save_pretrained(tmp, safe_serialization=True)
            for fn in sorted(os.listdir(tmp)):
                if fn.endswith(".safetensors"):
                    with safe_open(os.path.join(tmp, fn), "pt") as f:
                        for k in f.keys():
                            manifest[k] = list(f.get_slice(k).get_shape())
        n = sum(v.numel() for v in m.parameters())
        del m
        d = os.path.join(out, name)
        os.makedirs(d)
        cfg.save_pretrained(d)
        with open(os.path.join(d, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=0, sort_keys=True)
        print(f"  full-size {name}: {len(manifest)} tensors, {n / 1e6:.1f}M parameters")


def demo_assets():
    """The checkpoint and image embedded in the binary for `distillery features` with no
    arguments: a DINOv2-with-registers network at the real 224 px / patch 14 geometry."""
    from PIL import Image, ImageDraw

    assets = os.path.join(ROOT, "assets")
    d = os.path.join(assets, "demo-model")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    m = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
        hidden_size=48, num_hidden_layers=4, num_attention_heads=3, mlp_ratio=2, image_size=224, patch_size=14,
        num_register_tokens=4))
    randomize(m, 9)
    m.save_pretrained(d, safe_serialization=True)
    T.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                        do_convert_rgb=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(d)
    img = Image.new("RGB", (320, 240), (135, 190, 235))
    dr = ImageDraw.Draw(img)
    dr.rectangle([0, 170, 320, 240], fill=(90, 150, 70))
    dr.ellipse([230, 20, 290, 80], fill=(250, 220, 80))
    dr.polygon([(40, 170), (110, 70), (180, 170)], fill=(120, 110, 100))
    dr.rectangle([200, 120, 280, 175], fill=(170, 60, 50))
    img.save(os.path.join(assets, "sample.png"))
    print("  demo assets written")


# Photographs bundled for `distillery demo`: scikit-image's sample photos that carry a public
# domain or CC0 dedication (see assets/demo-photos/LICENSE.md for each one's source).
DEMO_PHOTOS = {
    "chelsea": "chelsea.png", "coffee": "coffee.png", "astronaut": "astronaut.png", "rocket": "rocket.jpg",
    "camera": "camera.png", "coins": "coins.png", "clock": "clock_motion.png", "text": "text.png",
    "hubble": "hubble_deep_field.jpg", "retina": "retina.jpg", "ihc": "ihc.png", "grass": "grass.png",
    "gravel": "gravel.png", "brick": "brick.png", "cell": "cell.png", "microaneurysms": "microaneurysms.png",
}


def demo_distill_assets():
    """Two tiny teachers of different families for `distillery demo` (a DINOv2 with registers
    and a SAM image encoder, both 128 px / patch 8, random weights at realistic scale) and the
    bundled photos, resized so the short side is 160 px."""
    from PIL import Image
    import skimage

    assets = os.path.join(ROOT, "assets")
    d = os.path.join(assets, "demo-teachers", "dinov2-demo")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    m = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2, image_size=128, patch_size=8,
        num_register_tokens=4))
    randomize(m, 12)
    m.save_pretrained(d, safe_serialization=True)
    T.BitImageProcessor(size={"shortest_edge": 146}, crop_size={"height": 128, "width": 128},
                        do_convert_rgb=True, image_mean=[0.485, 0.456, 0.406],
                        image_std=[0.229, 0.224, 0.225]).save_pretrained(d)
    d = os.path.join(assets, "demo-teachers", "sam-demo")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    svcfg = dict(hidden_size=64, output_channels=32, num_hidden_layers=8, num_attention_heads=4, mlp_dim=128,
                 image_size=128, patch_size=8, window_size=4, global_attn_indexes=[1, 3, 5, 7])
    sam = T.SamVisionModel(T.SamVisionConfig(**svcfg))
    randomize(sam, 13)
    sam.save_pretrained(d, safe_serialization=True)

    src = os.path.join(os.path.dirname(skimage.__file__), "data")
    out = os.path.join(assets, "demo-photos")
    os.makedirs(out, exist_ok=True)
    for name, f in DEMO_PHOTOS.items():
        im = Image.open(os.path.join(src, f)).convert("RGB")
        scale = 160 / min(im.size)
        im = im.resize((max(160, round(im.size[0] * scale)), max(160, round(im.size[1] * scale))), Image.LANCZOS)
        im.save(os.path.join(out, f"{name}.jpg"), quality=88)
    print("  demo teachers and", len(DEMO_PHOTOS), "photos written")


def randomize_cnn(model, seed):
    """Every parameter and BatchNorm buffer random at a realistic scale (timm leaves BN at the
    identity, and zero-initialises each block's last BN scale, which would hide branches)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * (p[0].numel() ** -0.5))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    model.eval()
    return model


def cnn_refs(m, name, x, x_train, bns, params, head="fc"):
    """timm's eval outputs (every forward_intermediates map, pre_logits, logits) on `x`, and one
    training-mode step on `x_train`: logits with batch statistics, the moved running statistics
    of the BatchNorms `bns`, and the gradients of mean(logits^2) for their weights, the
    parameters `params` and the classifier `head`."""
    import copy
    out = {"pixel_values": x}
    with torch.no_grad():
        for i, f in enumerate(m.forward_intermediates(x, intermediates_only=True)):
            out[f"stages.{i}"] = f.contiguous()
        feats = m.forward_features(x)
        out["pre_logits"] = m.forward_head(feats, pre_logits=True).contiguous()
        out["logits"] = m(x).contiguous()
    t = copy.deepcopy(m).train()
    y = t(x_train)
    (y ** 2).mean().backward()
    out["train.pixel_values"] = x_train
    out["train.logits"] = y.detach().contiguous()
    mods = dict(t.named_modules())
    named = dict(t.named_parameters())
    for bn in bns:
        out[f"train.{bn}.running_mean"] = mods[bn].running_mean.clone()
        out[f"train.{bn}.running_var"] = mods[bn].running_var.clone()
        out[f"grad.{bn}.weight"] = mods[bn].weight.grad.clone()
    for p in params + [f"{head}.weight"]:
        out[f"grad.{p}"] = named[p].grad.clone()
    save_file(out, os.path.join(REFS, f"{name}.safetensors"))
    print(f"  {name}: {[list(v.shape) for k, v in out.items() if k.startswith('stages.')]}")


def timm_cnns():
    """Tiny timm ResNets (basic blocks and bottlenecks, stride and projection shortcuts) with
    random weights and BN statistics, saved as timm hub folders, and their reference outputs at
    an odd, non-square input."""
    import timm
    from timm.models import _hub

    os.makedirs(REFS, exist_ok=True)
    cases = [
        ("timm-resnet-basic", "resnet18", dict(layers=[1, 1, 2, 1], channels=[8, 16, 24, 32],
                                               num_classes=5), 21,
         [("bn1", "conv1"), ("layer3.1.bn2", "layer3.1.conv2"), ("layer2.0.downsample.1", "layer2.0.downsample.0")]),
        ("timm-resnet-bottleneck", "resnet50", dict(layers=[1, 2, 1, 1], channels=[4, 8, 8, 12],
                                                    num_classes=7), 22,
         [("layer1.0.bn3", "layer1.0.conv3"), ("layer2.1.bn2", "layer2.1.conv2"),
          ("layer4.0.downsample.1", "layer4.0.downsample.0")]),
    ]
    for name, arch, args, seed, watch in cases:
        m = timm.create_model(arch, pretrained=False, **args)
        randomize_cnn(m, seed)
        d = fresh(name)
        _hub.save_for_hf(m, d, model_args=args, safe_serialization=True)
        cnn_refs(m, name, pixels(2, 45, 61, seed * 10 + 1), pixels(3, 37, 50, seed * 10 + 2),
                 [bn for bn, _ in watch], [f"{conv}.weight" for _, conv in watch])


def timm_mobilevit():
    """Tiny timm MobileViT-V2s (`width_factor` 0.25 of the 0.5x and 0.75x models: every block
    type, identity and no shortcuts, the make_divisible rounding) with random weights, GroupNorm
    affines and BN statistics, as timm hub folders, and their references at odd, non-square
    inputs (maps of odd side are resized before the 2x2 patching)."""
    import timm
    from timm.models import _hub

    os.makedirs(REFS, exist_ok=True)
    cases = [
        ("timm-mobilevitv2-050", "mobilevitv2_050", 6, 31),
        ("timm-mobilevitv2-075", "mobilevitv2_075", 4, 32),
    ]
    bns = ["stem.bn", "stages.1.1.conv3_1x1.bn", "stages.2.0.conv2_kxk.bn", "stages.3.1.conv_proj.bn"]
    params = ["stem.conv.weight", "stages.1.0.conv2_kxk.conv.weight",
              "stages.2.1.conv_1x1.weight", "stages.2.1.transformer.1.attn.qkv_proj.weight",
              "stages.3.1.transformer.0.attn.out_proj.bias", "stages.3.1.transformer.2.mlp.fc1.weight",
              "stages.4.1.transformer.0.norm1.weight", "stages.4.1.norm.weight", "stages.3.1.transformer.3.norm2.bias"]
    for name, arch, classes, seed in cases:
        args = dict(width_factor=0.25, num_classes=classes)
        m = timm.create_model(arch, pretrained=False, **args)
        randomize_cnn(m, seed)
        d = fresh(name)
        _hub.save_for_hf(m, d, model_args=dict(width_factor=0.25), safe_serialization=True)
        cnn_refs(m, name, pixels(2, 77, 83, seed * 10 + 1), pixels(3, 50, 66, seed * 10 + 2),
                 bns, params, head="head.fc")


def timm_fastvit():
    """Tiny timm FastViTs in their training form (sa12: RepMixer stages, conditional position
    encoding and an attention stage; t8: RepMixer only, MLP ratio 3) with random weights, layer
    scales and BN statistics, as timm hub folders with their references at odd, non-square
    inputs; and each one reparameterized by timm (`inference_mode=True` folder) with its eval
    outputs, to check the folded form."""
    import copy
    import timm
    from timm.models import _hub
    from timm.utils.model import reparameterize_model

    os.makedirs(REFS, exist_ok=True)
    common = ["stem.1.conv_kxk.0.conv.weight", "stages.0.blocks.0.token_mixer.layer_scale.gamma",
              "stages.1.downsample.proj.0.large_conv.conv.weight", "stages.2.blocks.0.mlp.fc1.weight",
              "final_conv.se.fc1.weight", "final_conv.conv_kxk.0.conv.weight"]
    cases = [
        ("timm-fastvit-sa12", "fastvit_sa12", dict(layers=[1, 1, 1, 1], embed_dims=[8, 16, 32, 32]), 5, 41,
         ["stem.0.conv_kxk.0.bn", "stages.0.blocks.0.token_mixer.mixer.identity",
          "stages.1.downsample.proj.0.small_conv.bn", "stages.3.blocks.0.norm"],
         common + ["stages.3.pos_emb.pos_enc.weight", "stages.3.blocks.0.token_mixer.qkv.weight",
                   "stages.3.blocks.0.layer_scale_1.gamma"]),
        ("timm-fastvit-t8", "fastvit_t8", dict(layers=[1, 2, 1, 1], embed_dims=[8, 16, 32, 64]), 3, 42,
         ["stem.2.identity", "stages.1.blocks.1.token_mixer.norm.identity",
          "stages.2.downsample.proj.1.conv_kxk.0.bn", "final_conv.conv_scale.bn"],
         common + ["stages.3.blocks.0.mlp.conv.conv.weight"]),
    ]
    for name, arch, args, classes, seed, bns, params in cases:
        m = timm.create_model(arch, pretrained=False, num_classes=classes, **args)
        randomize_cnn(m, seed)
        d = fresh(name)
        _hub.save_for_hf(m, d, model_args=args, safe_serialization=True)
        x = pixels(2, 75, 61, seed * 10 + 1)
        cnn_refs(m, name, x, pixels(3, 50, 66, seed * 10 + 2), bns, params, head="head.fc")
        fused = reparameterize_model(copy.deepcopy(m)).eval()
        fname = name + "-fused"
        d = fresh(fname)
        _hub.save_for_hf(fused, d, model_args=dict(args, inference_mode=True), safe_serialization=True)
        out = {"pixel_values": x}
        with torch.no_grad():
            for i, f in enumerate(fused.forward_intermediates(x, intermediates_only=True)):
                out[f"stages.{i}"] = f.contiguous()
            out["logits"] = fused(x).contiguous()
        save_file(out, os.path.join(REFS, f"{fname}.safetensors"))
        print(f"  {fname}: logits {list(out['logits'].shape)}")


def image_features(out):
    """transformers 5 returns an output object from get_image_features; 4.x a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def embed_refs():
    """Image-level embeddings of the committed fixture models, as the reference computes them
    (`gen_fixtures.py embed_refs` needs the model folders written by main()):
      refs/embed-<name>.safetensors: pixel_values, embedding (not normalised)
    CLIP: CLIPModel.get_image_features (post_layernorm + visual_projection); SigLIP: the
    vision tower's pooler_output (attention pooling head; what SiglipModel.get_image_features
    returns); DINOv2 / ViT: last_hidden_state[:, 0]; timm ViT: forward_head(pre_logits=True)."""
    import timm
    from safetensors.torch import load_file

    def save(name, x, e):
        save_file({"pixel_values": x.contiguous(), "embedding": e.contiguous()},
                  os.path.join(REFS, f"embed-{name}.safetensors"))
        print(f"  embed-{name}: input {list(x.shape)} -> {list(e.shape)}")

    with torch.no_grad():
        m = T.CLIPModel.from_pretrained(os.path.join(MODELS, "clip")).eval()
        x = pixels(3, 32, 32, 91)
        save("clip", x, image_features(m.get_image_features(pixel_values=x)))
        m = T.SiglipVisionModel.from_pretrained(os.path.join(MODELS, "siglip")).eval()
        x = pixels(3, 32, 32, 92)
        save("siglip", x, m(pixel_values=x).pooler_output)
        m = T.Dinov2Model.from_pretrained(os.path.join(MODELS, "dinov2")).eval()
        x = pixels(2, 35, 49, 93)
        save("dinov2", x, m(pixel_values=x).last_hidden_state[:, 0])
        m = T.ViTModel.from_pretrained(os.path.join(MODELS, "vit"), add_pooling_layer=False).eval()
        x = pixels(2, 32, 32, 94)
        save("vit", x, m(pixel_values=x).last_hidden_state[:, 0])
        args = json.load(open(os.path.join(MODELS, "timm-vit", "config.json")))["model_args"]
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
        m.load_state_dict(load_file(os.path.join(MODELS, "timm-vit", "model.safetensors")))
        m.eval()
        x = pixels(2, 32, 32, 95)
        save("timm-vit", x, m.forward_head(m.forward_features(x), pre_logits=True))


def target_norm():
    """Teacher-feature standardisation statistics as numpy computes them (float64), for
    `distillery::target_norm` (`gen_fixtures.py target_norm`):
      refs/target-norm.safetensors: maps.{0,1,2} (f32 [B, C, h, w], correlated channels with
      distinct means and scales, one nearly constant), mean, var (population), std, whiten,
      unwhiten (float64). Regulariser: eps = 1e-4 * mean channel variance, added to the
      variances (standardize) and to the covariance eigenvalues (ZCA whitening)."""
    import numpy as np
    from safetensors.numpy import save_file as save_np

    rng = np.random.default_rng(17)
    c = 8
    mix = rng.normal(size=(c, c)) * rng.uniform(0.2, 3.0, size=(1, c))
    mix[:, 5] = 0.0
    mix[5, :] = 0.0
    mix[5, 5] = 1e-3
    offset = rng.normal(scale=4.0, size=c)
    maps = []
    for b, h, w in [(2, 3, 5), (1, 4, 4), (3, 2, 3)]:
        z = rng.normal(size=(b * h * w, c)) @ mix.T + offset
        maps.append(z.reshape(b, h, w, c).transpose(0, 3, 1, 2).astype(np.float32))
    tok = np.concatenate([m.transpose(0, 2, 3, 1).reshape(-1, c) for m in maps]).astype(np.float64)
    mean = tok.mean(0)
    cov = (tok - mean).T @ (tok - mean) / tok.shape[0]
    var = np.diag(cov).copy()
    eps = 1e-4 * var.mean()
    lam, u = np.linalg.eigh(cov)
    lam = np.maximum(lam, 0.0) + eps
    out = {f"maps.{i}": np.ascontiguousarray(m) for i, m in enumerate(maps)}
    out.update(mean=mean, var=var, std=np.sqrt(var + eps),
               whiten=(u / np.sqrt(lam)) @ u.T, unwhiten=(u * np.sqrt(lam)) @ u.T)
    save_np(out, os.path.join(REFS, "target-norm.safetensors"))
    print(f"  target-norm: {tok.shape[0]} tokens x {c} channels")


def onnx_teacher():
    """A user's teacher as ONNX (`gen_fixtures.py onnx_teacher`): a tiny random timm ViT saved
    both as a timm folder (models/onnx-teacher: config.json, model.safetensors) and, exported by
    torch.onnx.export (opset 17, dynamic batch, 32x32 input), as models/onnx-teacher/teacher.onnx
    with two outputs: `features` (tokens after the last block, no final norm: what the folder's
    teacher distils at its last level) and `pooled` (the final norm's class token); the
    preprocessing (mean, std, rescale, input_size) in metadata_props.
    refs/onnx-teacher.safetensors: pixel_values [2,3,32,32], features, pooled (torch)."""
    import onnx
    import timm
    from timm.models import _hub

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    randomize(m, 23)
    d = fresh("onnx-teacher")
    _hub.save_for_hf(m, d, model_args=args, safe_serialization=True)

    class Wrapper(torch.nn.Module):
        def __init__(self, vit):
            super().__init__()
            self.vit = vit

        def forward(self, pixel_values):
            h = self.vit.norm_pre(self.vit._pos_embed(self.vit.patch_embed(pixel_values)))
            for blk in self.vit.blocks:
                h = blk(h)
            return h, self.vit.norm(h)[:, 0]

    w = Wrapper(m).eval()
    x = pixels(2, 32, 32, 91)
    path = os.path.join(d, "teacher.onnx")
    torch.onnx.export(w, (x,), path, input_names=["pixel_values"],
                      output_names=["features", "pooled"], opset_version=17,
                      dynamic_axes={"pixel_values": {0: "batch"}, "features": {0: "batch"},
                                    "pooled": {0: "batch"}}, dynamo=False)
    model = onnx.load(path)
    for k, v in [("mean", "0.5,0.5,0.5"), ("std", "0.5,0.5,0.5"), ("rescale", str(1 / 255)),
                 ("input_size", "32,32")]:
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(model, path)
    with torch.no_grad():
        f, pooled = w(x)
    save_file({"pixel_values": x.contiguous(), "features": f.contiguous(),
               "pooled": pooled.contiguous()}, os.path.join(REFS, "onnx-teacher.safetensors"))
    print(f"  onnx-teacher: {os.path.getsize(path)} bytes, ops "
          f"{sorted({n.op_type for n in model.graph.node})}")


def feature_loss():
    """Distillation feature losses and their gradients as torch computes them
    (`gen_fixtures.py feature_loss`), for `distillery::losses::feature_loss`:
      refs/feature-loss.safetensors, per case `a` (student 5x7 grid upsampled to the teacher's
      9x13) and `b` (teacher 5x7 upsampled to the student's 9x13), 61 channels:
      {case}.student, {case}.teacher (f32 maps), and per loss kind (cos_smooth_l1, cosine, mse)
      {case}.{kind}.loss and {case}.{kind}.grad (d loss / d student). Bilinear resizing with
      align_corners=False; cosine over each image's flattened map; SmoothL1 beta 1; mean MSE."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(29)
    out = {}
    for case, (b, sh, th) in {"a": (3, (5, 7), (9, 13)), "b": (2, (9, 13), (5, 7))}.items():
        s = (torch.randn(b, 61, *sh, generator=g) * 0.8).double()
        t = (torch.randn(b, 61, *th, generator=g) * 1.3 + 0.2).double()
        s, t = s.float(), t.float()
        out[f"{case}.student"], out[f"{case}.teacher"] = s.contiguous(), t.contiguous()
        for kind in ["cos_smooth_l1", "cosine", "mse"]:
            sv = s.clone().requires_grad_(True)
            size = max(sh, th, key=lambda x: x[0] * x[1])
            ss = F.interpolate(sv, size=size, mode="bilinear", align_corners=False) if sh != size else sv
            tt = F.interpolate(t, size=size, mode="bilinear", align_corners=False) if th != size else t
            cos = 1 - F.cosine_similarity(ss.flatten(1), tt.flatten(1), dim=1, eps=1e-8).mean()
            loss = {"cos_smooth_l1": 0.9 * cos + 0.1 * F.smooth_l1_loss(ss, tt, beta=1.0),
                    "cosine": cos, "mse": F.mse_loss(ss, tt)}[kind]
            loss.backward()
            out[f"{case}.{kind}.loss"] = loss.detach().reshape(1)
            out[f"{case}.{kind}.grad"] = sv.grad.contiguous()
    save_file(out, os.path.join(REFS, "feature-loss.safetensors"))
    print(f"  feature-loss: {len(out)} tensors")


def vit_block():
    """One timm ViT `Block` and its gradients as torch computes them (`gen_fixtures.py
    vit_block`), for the fused training block (`distillery::kernels::vit_block_train`):
      refs/vit-block.safetensors, per case `a` (dim 48, 3 heads, qkv bias, no layer scale) and
      `b` (dim 40, 5 heads, no qkv bias, layer scale, mlp ratio 3): {case}.param.<timm name>
      (every parameter random), {case}.x [2, 13, dim], {case}.dy (the upstream gradient),
      {case}.y = block(x), {case}.dx and {case}.grad.<timm name> = d sum(y * dy) / d param."""
    from timm.models.vision_transformer import Block

    g = torch.Generator().manual_seed(31)
    out = {}
    for case, (dim, heads, qkv_bias, ls, ratio) in {
        "a": (48, 3, True, None, 4.0),
        "b": (40, 5, False, 0.5, 3.0),
    }.items():
        blk = randomize(Block(dim, heads, mlp_ratio=ratio, qkv_bias=qkv_bias, init_values=ls), 37)
        x = (torch.randn(2, 13, dim, generator=g) * 1.5 + 0.3).requires_grad_(True)
        dy = torch.randn(2, 13, dim, generator=g)
        y = blk(x)
        (y * dy).sum().backward()
        out[f"{case}.x"], out[f"{case}.dy"] = x.detach().contiguous(), dy.contiguous()
        out[f"{case}.y"], out[f"{case}.dx"] = y.detach().contiguous(), x.grad.contiguous()
        for name, p in blk.named_parameters():
            out[f"{case}.param.{name}"] = p.detach().contiguous()
            out[f"{case}.grad.{name}"] = p.grad.contiguous()
    save_file(out, os.path.join(REFS, "vit-block.safetensors"))
    print(f"  vit-block: {len(out)} tensors")


def adapter():
    """One SAK adapter step `y = s + scale * up(gelu(down(s)))`, `s = r + x`, and its gradients
    as torch computes them (`gen_fixtures.py adapter`), for the fused adapter node
    (`distillery::kernels::adapter_train`): refs/adapter.safetensors with param.{down,up}.{weight,
    bias} and param.scale (random; dim 40, bottleneck 10), r and x [2, 13, 40], dy, and per case
    `sum` (s = r + x) and `single` (s = x): {case}.y, {case}.dr (sum only), {case}.dx and
    {case}.grad.<param> = d sum(y * dy) / d param."""
    g = torch.Generator().manual_seed(41)
    d, k = 40, 10
    params = {
        "down.weight": torch.randn(k, d, generator=g) * d ** -0.5,
        "down.bias": torch.randn(k, generator=g) * 0.1,
        "up.weight": torch.randn(d, k, generator=g) * k ** -0.5,
        "up.bias": torch.randn(d, generator=g) * 0.1,
        "scale": torch.tensor([0.7]),
    }
    r = torch.randn(2, 13, d, generator=g)
    x = torch.randn(2, 13, d, generator=g) * 1.3
    dy = torch.randn(2, 13, d, generator=g)
    out = {f"param.{n}": v.contiguous() for n, v in params.items()}
    out.update(r=r, x=x, dy=dy)
    for case in ["sum", "single"]:
        p = {n: v.clone().requires_grad_(True) for n, v in params.items()}
        rv, xv = r.clone().requires_grad_(True), x.clone().requires_grad_(True)
        s = rv + xv if case == "sum" else xv
        h = F.gelu(F.linear(s, p["down.weight"], p["down.bias"]))
        y = s + p["scale"] * F.linear(h, p["up.weight"], p["up.bias"])
        (y * dy).sum().backward()
        out[f"{case}.y"], out[f"{case}.dx"] = y.detach().contiguous(), xv.grad.contiguous()
        if case == "sum":
            out[f"{case}.dr"] = rv.grad.contiguous()
        for n, v in p.items():
            out[f"{case}.grad.{n}"] = v.grad.contiguous()
    save_file(out, os.path.join(REFS, "adapter.safetensors"))
    print(f"  adapter: {len(out)} tensors")


if __name__ == "__main__":
    # `gen_fixtures.py student_sources` regenerates one section only.
    if len(sys.argv) > 1:
        torch.manual_seed(0)
        for name in sys.argv[1:]:
            globals()[name]()
    else:
        sys.exit(main())
