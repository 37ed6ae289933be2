"""GPU check: the fused attention gives the same vit_b outputs as segment-anything's, in fp32 and bf16."""
import sys, torch
sys.path.insert(0, "custom")
from fedfms.models import ModelConfig, build_model
cfg = dict(variant="vit_b", mode="fedmsa", pretrained=False)
a = build_model(ModelConfig(**cfg, fused_attention=False)).cuda().eval()
b = build_model(ModelConfig(**cfg, fused_attention=True)).cuda().eval()
b.load_state_dict(a.state_dict())
x = torch.rand(2, 3, 1024, 1024, device="cuda")
with torch.no_grad():
    ya, yb = a(x), b(x)
    print("fp32 max abs diff fused vs stock", (ya - yb).abs().max().item(), "scale", ya.abs().max().item())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        za, zb = a(x).float(), b(x).float()
    print("bf16 max abs diff fused vs stock", (za - zb).abs().max().item(), "vs fp32", (za - ya).abs().max().item())
