"""Tokens/s of batch-1 (and batch-8) greedy decoding, ours vs transformers' generate.

Same random-weight model, bf16, one GPU, 256 new tokens after a short prompt (prefill included in the time):
  ours          eval.py's loop (engine.generate): static KV cache, the one-token step recorded as a CUDA
                graph; at batch <= 4 of a Llama the step is fast_decode.py's Triton kernels (five per layer)
                with greedy decoding's pick recorded in the same graph, else inductor's
  ours_inductor the same loop with the step always inductor's (engine.Decoder kernels=False)
  ours_no_pdl   ours with the kernels launched one after the other (NoPDL: fast_decode's pdl=False)
  ours_pick_outside_graph  ours with each greedy pick (and the next step's slot) taken between two replays
                of the recorded step rather than inside it (PickOutsideGraph)
  ours_prefill_no_graph  ours with the compiled prompt pass not recorded as a CUDA graph (PrefillNoGraph)
  ours_eager_prefill  the same, with the prompt pass not compiled (EagerPrefill)
  ours_eager    the same loop without torch.compile
  hf_dynamic    transformers generate with its default dynamic cache
  hf_static     transformers generate with cache_implementation="static": generate then compiles the
                one-token forward itself (torch.compile, mode="reduce-overhead"; its prompt pass stays eager)
  bound         memory-bandwidth limit at batch 1: every token reads every weight once,
                tokens/s <= bandwidth / parameter bytes (H100 SXM: 3.35e12 B/s)
Each ours_* alternative is engine.Decoder with one small method overridden here.

    python bench.py decode --presets 350m,1.1b --batch_sizes 1,8
"""
import tempfile

import torch

import fast_decode
from benchmarks.common import best_wall_s, pick, require_cuda, reset_peak
from engine import Decoder, GenerationConfig, generate
from model import ModelArgs, Transformer


class NoPDL(Decoder):
    """The Triton kernels (and the recorded greedy pick) launched one after the other."""

    def kernels_step(self, tokens, cache, cache_pos):
        return fast_decode.decode_step(self.model, tokens, cache, cache_pos, pdl=False)

    def kernels_pick(self, logits, out, record):
        return fast_decode.argmax(logits, out=out, record=record, pdl=False)


class PickOutsideGraph(Decoder):
    """Greedy picks between two replays of the recorded step (the loop sampling and penalties use)."""

    def picks_in_graph(self, batch_size):
        return False


class PrefillNoGraph(Decoder):
    """The prompt pass compiled but not recorded as a CUDA graph."""

    def compile_prefill(self, prefill):
        return torch.compile(prefill)


class EagerPrefill(Decoder):
    """The prompt pass not compiled."""

    def compile_prefill(self, prefill):
        return None


# entry -> its decoder
DECODERS = {"ours": lambda m: Decoder(m, compile=True),
            "ours_inductor": lambda m: Decoder(m, compile=True, kernels=False),
            "ours_no_pdl": lambda m: NoPDL(m, compile=True),
            "ours_pick_outside_graph": lambda m: PickOutsideGraph(m, compile=True),
            "ours_prefill_no_graph": lambda m: PrefillNoGraph(m, compile=True),
            "ours_eager_prefill": lambda m: EagerPrefill(m, compile=True),
            "ours_eager": lambda m: Decoder(m)}
ENTRIES = [*DECODERS, "hf_dynamic", "hf_static"]


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
        cfg = GenerationConfig(max_new_tokens=n_new, stop_ids=[])  # no stop: always n_new tokens
        for B in [int(b) for b in args.batch_sizes.split(",")]:
            prompts = torch.randint(4, args.vocab_size, (B, args.prompt_len)).tolist()
            ids = torch.tensor(prompts, device="cuda")
            mask = torch.ones_like(ids)

            def ours(decoder):
                out = generate(decoder, prompts, cfg, pad_id=0)
                assert all(len(o) == n_new for o in out)

            def hf_generate(**kw):
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                  do_sample=False, pad_token_id=0, **kw)
                assert out.shape[1] == args.prompt_len + n_new

            def entry(name):
                """(the timed call, its warm-up runs: compile and CUDA graph recording happen there)"""
                if name in DECODERS:
                    decoder = DECODERS[name](model)
                    return (lambda: ours(decoder)), (1 if name == "ours_eager" else 2)
                # transformers' static cache: generate compiles its decode step itself (wrapping forward in
                # torch.compile as well would compile twice, nested)
                static = {"cache_implementation": "static"} if name == "hf_static" else {}
                return (lambda: hf_generate(**static)), (2 if static else 1)

            for name in [e for e in ENTRIES if e in entries]:
                fn, warmup = entry(name)
                for _ in range(warmup):
                    fn()
                print(f"{preset}_b{B}_{name}_tok/s: {B * n_new / best_wall_s(fn, args.repeats):.0f}")
                del fn  # and its decoder
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

