"""Tokens/s of batch-1 (and batch-8) greedy decoding, ours vs transformers' generate.

Same random-weight model, bf16, one GPU, 256 new tokens after a short prompt (prefill included in the time):
  ours          eval.py's loop: static KV cache, the one-token step recorded as a CUDA graph; at batch <= 4
                of a Llama the step is fast_decode.py's Triton kernels (five per layer), else inductor's
  ours_inductor the same loop with the step always inductor's (eval.Decoder kernels=False)
  ours_no_pdl   ours with the kernels launched one after the other (fast_decode.USE_PDL off)
  ours_pick_outside_graph  ours with each greedy pick (and the next step's slot) taken between two replays
                of the recorded step rather than inside it (eval.GREEDY_IN_GRAPH off)
  ours_torch_argmax  ours_pick_outside_graph with torch's argmax instead of fast_decode.argmax
  ours_prefill_no_graph  ours with the compiled prompt pass not recorded as a CUDA graph (prefill_graphs=False)
  ours_eager_prefill  the same, with the prompt pass not compiled (eval.Decoder compile_prefill=False)
  ours_eager    the same loop without torch.compile
  hf_dynamic    transformers generate with its default dynamic cache
  hf_static     transformers generate with cache_implementation="static": generate then compiles the
                one-token forward itself (torch.compile, mode="reduce-overhead"; its prompt pass stays eager)
  bound         memory-bandwidth limit at batch 1: every token reads every weight once,
                tokens/s <= bandwidth / parameter bytes (H100 SXM: 3.35e12 B/s)

    python bench.py decode --presets 350m,1.1b --batch_sizes 1,8
"""
import tempfile

import torch

import eval as ev
import fast_decode
from benchmarks.common import best_wall_s, pick, require_cuda, reset_peak
from model import ModelArgs, Transformer


ENTRIES = ["ours", "ours_inductor", "ours_no_pdl", "ours_pick_outside_graph", "ours_torch_argmax",
           "ours_prefill_no_graph", "ours_eager_prefill", "ours_eager", "hf_dynamic", "hf_static"]


def run(args):
    entries = pick(args.entries, ENTRIES, "decode --entries")
    require_cuda("decode")
    from transformers import AutoModelForCausalLM

    n_new, dtype = args.new_tokens, torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name()}")
    print(f"new_tokens: {n_new}")
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        model = Transformer(ModelArgs.preset(preset, vocab_size=args.vocab_size)).to("cuda", dtype).eval()
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"{preset}_params_M: {param_bytes / 2 / 1e6:.0f}")
        print(f"{preset}_bound_b1_tok/s: {args.bandwidth / param_bytes:.0f}")
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to("cuda").eval()
        cfg = ev.GenerationConfig(max_new_tokens=n_new, stop_ids=[])  # no stop: always n_new tokens
        for B in [int(b) for b in args.batch_sizes.split(",")]:
            decoder, decoder_eager = ev.Decoder(model, compile=True), ev.Decoder(model)
            decoder_inductor = ev.Decoder(model, compile=True, kernels=False)
            decoder_no_pdl = ev.Decoder(model, compile=True)
            decoder_eager_prefill = ev.Decoder(model, compile=True, compile_prefill=False)
            decoder_prefill_no_graph = ev.Decoder(model, compile=True, prefill_graphs=False)
            prompts = torch.randint(4, args.vocab_size, (B, args.prompt_len)).tolist()
            ids = torch.tensor(prompts, device="cuda")
            mask = torch.ones_like(ids)
            tag = f"{preset}_b{B}"

            def ours(dec=decoder):
                out = ev.generate(dec, prompts, cfg, pad_id=0)
                assert all(len(o) == n_new for o in out)

            def ours_without(*switches, dec=decoder):
                # ours with module switches, (module, name) pairs, off for this call only. fast_decode.USE_PDL
                # is read when the graph is recorded (the first step on a cache, in the entry's warm-up): its
                # own decoder keeps the graph recorded without PDL after the switch is back on
                for module, name in switches:
                    setattr(module, name, False)
                try:
                    ours(dec)
                finally:
                    for module, name in switches:
                        setattr(module, name, True)

            def hf_generate(**kw):
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                  do_sample=False, pad_token_id=0, **kw)
                assert out.shape[1] == args.prompt_len + n_new

            no_pdl, outside, torch_argmax = (fast_decode, "USE_PDL"), (ev, "GREEDY_IN_GRAPH"), (ev, "USE_TRITON_ARGMAX")
            # transformers' static cache: generate compiles its decode step itself (wrapping forward in
            # torch.compile as well would compile twice, nested)
            for name, fn, warmup in [("ours", ours, 2), ("ours_inductor", lambda: ours(decoder_inductor), 2),
                                     ("ours_no_pdl", lambda: ours_without(no_pdl, dec=decoder_no_pdl), 2),
                                     ("ours_pick_outside_graph", lambda: ours_without(outside), 1),
                                     ("ours_torch_argmax", lambda: ours_without(outside, torch_argmax), 1),
                                     ("ours_prefill_no_graph", lambda: ours(decoder_prefill_no_graph), 2),
                                     ("ours_eager_prefill", lambda: ours(decoder_eager_prefill), 2),
                                     ("ours_eager", lambda: ours(decoder_eager), 1),
                                     ("hf_dynamic", hf_generate, 1),
                                     ("hf_static", lambda: hf_generate(cache_implementation="static"), 2)]:
                if name not in entries:
                    continue
                for _ in range(warmup):  # compile + CUDA graph recording happen here
                    fn()
                print(f"{tag}_{name}_tok/s: {B * n_new / best_wall_s(fn, args.repeats):.0f}")
            del decoder, decoder_eager, decoder_eager_prefill, decoder_inductor, decoder_no_pdl
            del decoder_prefill_no_graph
            torch._dynamo.reset()  # drop the compiled graphs of this batch size before the next
        del model, hf
        reset_peak()


def add_args(p):
    p.add_argument("--presets", default="350m,1.1b", help="comma-separated model.py presets to measure")
    p.add_argument("--batch_sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--entries", default=",".join(ENTRIES),
                   help="comma-separated subset to run (the eager ones take minutes at ~40 tok/s)")
    p.add_argument("--new_tokens", type=int, default=256, help="tokens generated per sequence")
    p.add_argument("--prompt_len", type=int, default=16, help="prompt tokens per sequence (random ids)")
    p.add_argument("--vocab_size", type=int, default=32000, help="vocabulary of the random model")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per entry (best is reported)")
    p.add_argument("--bandwidth", type=float, default=3.35e12, help="GPU memory bandwidth in B/s for the bound")

