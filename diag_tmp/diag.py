import time, torch, sys
sys.path.insert(0, ".")
import eval as ev
from model import ModelArgs, Transformer
variant = sys.argv[1]
if variant == "cdt":
    torch._inductor.config.coordinate_descent_tuning = True
torch.manual_seed(0)
m = Transformer(ModelArgs.preset("350m", vocab_size=32000)).to("cuda", torch.bfloat16).eval()
dec = ev.Decoder(m, compile=True)
if variant == "autotune":
    dec._compiled_step = torch.compile(dec._step, mode="max-autotune", fullgraph=True, dynamic=False)
cfg = ev.GenerationConfig(max_new_tokens=256, stop_ids=[])
t0 = time.time()
for B in (1,):
  for rep in range(4):
    torch.cuda.synchronize(); t = time.perf_counter()
    ev.generate(dec, [[5]*16] * B, cfg, 0)
    torch.cuda.synchronize(); print(f"{variant} B={B} generate tok/s {B * 256 / (time.perf_counter() - t):.0f}", flush=True)
print("total s", time.time() - t0)
