"""Judge a checkpoint: perplexity, text generation, chat and multiple-choice accuracy.

    python eval.py ppl      --model out/pretrain --data data/x_val.bin [--stride 256]
                            [--max_seq_len 2048 --rope_scaling '{"rope_type":"yarn","factor":2}']
    python eval.py generate --model out/sft --prompt "Once upon a time" [--temperature 0.8 --top_p 0.9 | --num_beams 4]
    python eval.py chat     --model out/sft [--adapter out/sft_lora] [--chat_inputs turns.txt]
    python eval.py mc       --model out/sft --data ceval_like.json
    python eval.py          # report on the newest `bash run.sh` model: held-out perplexity and a few chats

Every checkpoint the repo writes loads here: a pretrain or SFT folder, a trainer's step_N/, a GPTQ folder
(through Transformer.from_pretrained), or a base folder plus a LoRA adapter (`--adapter`, merged by peft).
Without --model (and ppl's --data) the newest `bash run.sh` outputs are used (out/latest.json).
Each subcommand is one function below; the work is done by library modules: scoring.py (perplexity,
option log-likelihoods) and engine.py (the decoder, sampling, beam search, stop strings, streaming).
On a GPU `--compile` runs the decode step as a CUDA graph (engine.Decoder).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

import cli
from attention import ATTN_IMPLS
from checkpoint import model_folder
from engine import Decoder, GenerationConfig, Streamer, finish_text, generate, load_model, load_tokenizer, request_seed
from scoring import mc_accuracy, perplexity, read_mc, utf8_bytes
from tokenizer import END_TOKEN, render_chat
from tokens import check_token_file, load_token_file


# ----------------------------------------------------------------------------- subcommands

def run_ppl(args, model, tokenizer, context):
    tokens, meta = load_token_file(args.data)
    check_token_file(meta, tokenizer.vocab_size, tokenizer.file_hash, path=args.data)
    tokens = tokens[:args.max_tokens] if args.max_tokens else tokens
    if len(tokens) < 2:
        raise SystemExit(f"--data {args.data}: fewer than 2 tokens, nothing to score")
    t0 = time.time()
    nll, n = perplexity(model, tokens, context, args.stride, args.batch_size, args.device, progress=True)
    # bits per byte = bits per token * tokens per byte: comparable across tokenizers
    nll_per_token = nll / n
    print(f"ppl: {math.exp(nll_per_token):.4f}")
    print(f"bpb: {nll_per_token / math.log(2) * len(tokens) / utf8_bytes(tokenizer, tokens):.4f}")
    print(f"tokens: {n}")
    print(f"seq_len: {context}")
    print(f"seconds: {time.time() - t0:.1f}")


REPORT_CHATS = ("你好", "你叫什么名字？", "你喜欢看书吗？")  # the turns run.sh's eval stage asks too


def run_report(args, model, tokenizer, context):
    """The default of `python eval.py`: perplexity on each held-out token file, then a few chat turns."""
    if args.data:
        held_out = [args.data]
    else:
        found = [cli.pipeline_path("val_data", "--data", required=False),
                 (cli.pipeline_path("sft_val", "--data", required=False) or "") + ".bin"]
        held_out = [path for path in found if path and os.path.isfile(path)]
    print(f"model: {args.model}")
    for path in held_out:
        print(f"data: {path}")
        run_ppl(argparse.Namespace(**{**vars(args), "data": path}), model, tokenizer, context)
    cfg = generation_config(args, tokenizer)
    chat(Decoder(model, compile=args.compile), tokenizer, cfg, REPORT_CHATS, context, seed=args.seed)


def run_mc(args, model, tokenizer):
    acc, acc_norm = mc_accuracy(model, tokenizer, read_mc(args.data), args.prompt_format, bos=not args.no_bos)
    print(f"acc: {acc:.4f}")
    print(f"acc_norm: {acc_norm:.4f}")


def read_prompts(args):
    if args.prompt is not None:
        return [args.prompt]
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise SystemExit(f"--prompt_file: {e}")
    if not texts:
        raise SystemExit(f"--prompt_file {args.prompt_file}: no prompts (one per non-empty line)")
    return texts


def run_generate(args, decoder, tokenizer, cfg, context):
    texts = read_prompts(args)
    bos = [] if args.no_bos else [tokenizer.bos_id]
    prompts = [bos + ids for ids in tokenizer.encode_batch(texts)]
    if max(map(len, prompts)) + cfg.max_new_tokens > context:
        print(f"warning: prompt + max_new_tokens exceeds the context of {context} tokens", file=sys.stderr)
    print(f"seed: {request_seed(args.seed)}")
    stream = len(prompts) == 1 and cfg.num_beams == 1
    if stream:
        sys.stdout.write(texts[0])
    t0 = time.time()
    new = generate(decoder, prompts, cfg, tokenizer.pad_id, tokenizer,
                   Streamer(tokenizer, cfg.stop_strings) if stream else None)
    dt = time.time() - t0
    if stream:
        print()
    else:
        for i, ids in enumerate(new):
            print(f"output_{i}: {json.dumps(texts[i] + finish_text(tokenizer, ids, cfg), ensure_ascii=False)}")
    n_new = sum(map(len, new))
    print(f"new_tokens: {n_new}")
    print(f"tokens/s: {n_new / dt:.1f}")


def utf8_lines(binary, name):
    """Text lines of a binary stream (stdin, a file); a line that is not UTF-8 stops with one line naming it."""
    for n, raw in enumerate(binary, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            cli.fail(f"{name}:{n}", f"not valid UTF-8 ({e.reason} at byte {e.start})")


def run_chat(args, decoder, tokenizer, cfg, context):
    if args.chat_inputs:
        with open(args.chat_inputs, "rb") as f:
            lines = list(utf8_lines(f, args.chat_inputs))
        interactive = False
    else:
        interactive = sys.stdin.isatty()
        lines = iter(lambda: input("user: "), None) if interactive else utf8_lines(sys.stdin.buffer, "stdin")
    try:
        chat(decoder, tokenizer, cfg, lines, context, args.system, interactive, args.seed)
    except (EOFError, KeyboardInterrupt):
        print()


def chat(decoder, tokenizer, cfg, lines, context=None, system=None, interactive=False, seed=None, out=None):
    """Multi-turn chat over THE template (tokenizer.render_chat). Each user line is a turn; the reply
    stops at <|end|>. "/reset" forgets the conversation, "/exit" ends. Old exchanges are dropped when the
    conversation no longer fits `context` tokens; a turn that does not fit alone is not answered (a note says
    so). Interactive: the reply streams; otherwise every turn is
    one line (`user: ...`, `assistant: "json string"`) for scripts."""
    out = out or sys.stdout  # looked up per call (not bound at import): a redirected stdout is honoured
    end_id = tokenizer.token_id(END_TOKEN)
    cfg.stop_ids = sorted(set(cfg.stop_ids) | {i for i in (end_id, tokenizer.eos_id) if i is not None})
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    max_prompt = (context or decoder.model.args.max_seq_len) - cfg.max_new_tokens
    for line in lines:
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = list(start)
            print("reset: ok", file=out)
            continue
        if not line.strip():
            continue
        if not interactive:
            print(f"user: {line}", file=out)
        messages.append({"role": "user", "content": line})
        ids, _ = render_chat(tokenizer, messages, add_generation_prompt=True)
        while len(ids) > max_prompt and len(messages) > len(start) + 1:
            messages = start + messages[len(start) + 2:]  # drop the oldest user/assistant exchange
            ids, _ = render_chat(tokenizer, messages, add_generation_prompt=True)
        if len(ids) > max_prompt:  # never decode past the context: say so and leave this turn out
            print(f"note: this turn needs {len(ids)} prompt tokens, more than the {max_prompt} the context leaves "
                  f"({max_prompt + cfg.max_new_tokens} - max_new_tokens {cfg.max_new_tokens}); not answered", file=out)
            messages.pop()
            continue
        if cfg.temperature > 0:
            print(f"seed: {request_seed(seed)}", file=out)
        out.write("assistant: ")
        streamer = Streamer(tokenizer, cfg.stop_strings, out) if interactive and cfg.num_beams == 1 else None
        new = generate(decoder, [ids], cfg, tokenizer.pad_id, tokenizer, streamer)[0]
        reply = finish_text(tokenizer, new, cfg)
        out.write("\n" if streamer else json.dumps(reply, ensure_ascii=False) + "\n")
        out.flush()
        messages.append({"role": "assistant", "content": reply})


# ----------------------------------------------------------------------------- CLI

def parse_json_flag(flag, value):
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{flag}: not valid JSON ({e})")


def generation_config(args, tokenizer) -> GenerationConfig:
    """The generate / chat flags, checked, as a GenerationConfig (EOS always stops)."""
    try:
        stop_ids = [int(s) for s in args.stop_ids.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--stop_ids {args.stop_ids}: expected comma-separated integers")
    stop_strings = parse_json_flag("--stop_strings", args.stop_strings)
    bad_words = parse_json_flag("--bad_words", args.bad_words)
    if not all(isinstance(s, str) for s in stop_strings + bad_words):
        raise SystemExit("--stop_strings / --bad_words: expected a JSON list of strings")
    if args.num_beams > 1 and args.temperature > 0:
        raise SystemExit("--num_beams > 1 with --temperature > 0: beam search here is deterministic; pick one")
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, num_beams=args.num_beams, length_penalty=args.length_penalty,
        early_stopping={"false": False, "true": True, "never": "never"}[args.early_stopping],
        stop_ids=[tokenizer.eos_id] + stop_ids, stop_strings=stop_strings,
        bad_words_ids=[tokenizer.encode(w) for w in bad_words if w])


def model_args():
    """The flags of every subcommand: which checkpoint, on what, with which context."""
    p = cli.parser(None, add_help=False)
    p.add_argument("--model", help="checkpoint folder (pretrain / SFT / step_N / GPTQ / HF Llama or NeoX; default: "
                   "the newest `bash run.sh` model, out/latest.json)")
    p.add_argument("--adapter", help="LoRA adapter folder (peft) to merge into --model")
    p.add_argument("--tokenizer", help="tokenizer file or folder (default: the one in --adapter or --model)")
    p.add_argument("--device", default=cli.default_device(), help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=["auto", *cli.DTYPES], default="auto",
                   help="weights dtype; auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--max_seq_len", type=cli.positive_int,
                   help="context to use (ppl window, chat history) instead of the trained one: length extrapolation")
    p.add_argument("--rope_scaling", help='override the rope scaling, JSON, e.g. \'{"rope_type":"yarn","factor":2}\' '
                   '(scaled relative to the trained length)')
    p.add_argument("--attn_impl", help=f"override the attention backend ({' | '.join(ATTN_IMPLS)})")
    cli.add_flag(p, "--no_bos", False, "do not start prompts with the BOS token")
    return p


def generation_args():
    """The flags of generate and chat."""
    p = cli.parser(None, add_help=False)
    p.add_argument("--max_new_tokens", type=cli.nonneg_int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=cli.nonneg_float, default=0.0, help="0: greedy; > 0: sample from softmax(logits / T)")
    p.add_argument("--top_k", type=cli.positive_int, help="sample only among the k most likely tokens")
    p.add_argument("--top_p", type=cli.probability, help="sample only among the smallest set of tokens with probability >= p")
    p.add_argument("--repetition_penalty", type=cli.positive_float, default=1.0, help="> 1 discourages tokens already seen (CTRL)")
    p.add_argument("--num_beams", type=cli.positive_int, default=1, help="> 1: beam search with this many beams")
    p.add_argument("--length_penalty", type=cli.number(float), default=1.0, help="beam search: score = logprob / len ** this")
    p.add_argument("--early_stopping", choices=["false", "true", "never"], default="false",
                   help="beam search stop rule, as transformers")
    p.add_argument("--stop_ids", default="", help="comma-separated token ids that end a sequence (EOS always does)")
    p.add_argument("--stop_strings", default="[]", help='JSON list of strings that end a sequence, e.g. \'["\\n\\n"]\'')
    p.add_argument("--bad_words", default="[]", help="JSON list of strings that may never be generated")
    p.add_argument("--seed", type=int, help="sampling seed (default: a fresh random one per request, printed)")
    cli.add_flag(p, "--compile", False,
                 "CUDA: run the decode step as a CUDA graph (fast_decode.py's Triton kernels for a Llama at "
                 "batch <= 4, else torch.compile'd) and compile the prompt pass, recorded as a CUDA graph per "
                 "prompt shape (ignored on the CPU)")
    return p


def build_parser():
    p = cli.parser(__doc__)
    sub = p.add_subparsers(dest="cmd", metavar="{ppl,generate,chat,mc,report}",
                           help="what to run (default: report)")
    common, gen = model_args(), generation_args()

    def add(name, parents, help):
        return sub.add_parser(name, parents=parents, help=help, formatter_class=cli.HelpFormatter)

    pp = add("ppl", [common], "perplexity and bits per byte on a .bin token file")
    pp.add_argument("--data", help="token file X.bin (with its X.json) from data_process.py (default: the "
                    "held-out tokens of the newest `bash run.sh`)")
    pp.add_argument("--stride", type=cli.positive_int,
                    help="sliding windows that advance by this many tokens (default: none overlap)")
    pp.add_argument("--batch_size", type=cli.positive_int, default=8, help="windows per forward")
    pp.add_argument("--max_tokens", type=cli.positive_int, help="evaluate only the first N tokens of the file")
    pg = add("generate", [common, gen], "continue a prompt (or a file of prompts, one per line)")
    src = pg.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt_file", help="a file with one prompt per line, run as one left-padded batch")
    pc = add("chat", [common, gen], "multi-turn chat (/reset, /exit)")
    pc.add_argument("--system", help="system message opening the conversation")
    pc.add_argument("--chat_inputs", help="file of user turns, one per line (default: stdin, interactive on a tty)")
    pm = add("mc", [common], "multiple-choice accuracy by option log-likelihood")
    pm.add_argument("--data", required=True, help="JSON list / JSON lines of {question, A..D | options, answer}")
    pm.add_argument("--prompt_format", default="{question}\n答案：",
                    help="how the question is shown before an option")
    pr = add("report", [common, generation_args()], "perplexity on the held-out token files, then a few chat turns "
             "(what `python eval.py` alone runs)")
    pr.add_argument("--stride", type=cli.positive_int, help="sliding windows that advance by this many tokens (default: none overlap)")
    pr.add_argument("--data", help="token file to score (default: the newest `bash run.sh`'s held-out files)")
    pr.add_argument("--batch_size", type=cli.positive_int, default=8, help="windows per forward")
    pr.add_argument("--max_tokens", type=cli.positive_int, help="score only the first N tokens of each file")
    pr.set_defaults(max_new_tokens=40, repetition_penalty=1.1)  # on its own copy of the generation flags
    return p


def load(args):
    """The model and tokenizer the flags name, on --device in --dtype."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    on_gpu = args.device.startswith("cuda")
    dtype = cli.torch_dtype(args.dtype) if args.dtype != "auto" else (torch.bfloat16 if on_gpu else torch.float32)
    # the model keeps its trained max_seq_len: RoPE scalings measure extension against it (YaRN's
    # original length, dynamic NTK's threshold); --max_seq_len only sets how much context is used here
    args.model = model_folder(args.model or cli.pipeline_path("model", "--model"))
    if args.cmd == "ppl" and not args.data:
        args.data = cli.pipeline_path("val_data", "--data")
    overrides = {}
    if args.rope_scaling:
        overrides["rope_scaling"] = parse_json_flag("--rope_scaling", args.rope_scaling)
    if args.attn_impl:
        overrides["attn_impl"] = args.attn_impl
    tokenizer = load_tokenizer(args.model, args.adapter, args.tokenizer)
    return load_model(args.model, args.adapter, args.device, dtype, **overrides), tokenizer


@cli.boundary
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["report", *argv]  # `python eval.py [flags]`: the default report
    args = build_parser().parse_args(argv)
    model, tokenizer = load(args)
    context = args.max_seq_len or model.args.max_seq_len
    if (getattr(args, "stride", None) or 0) > context:  # windows would skip the tokens between them
        cli.fail(f"--stride {args.stride}", f"larger than the context of {context} tokens (--max_seq_len)")
    if args.cmd == "chat" and args.max_new_tokens >= context:
        cli.fail(f"--max_new_tokens {args.max_new_tokens}", f"leaves no room for a prompt in the context of "
                 f"{context} tokens (--max_seq_len)")
    if args.cmd == "report":
        return run_report(args, model, tokenizer, context)
    if args.cmd == "ppl":
        return run_ppl(args, model, tokenizer, context)
    if args.cmd == "mc":
        return run_mc(args, model, tokenizer)
    cfg = generation_config(args, tokenizer)
    decoder = Decoder(model, compile=args.compile)
    if args.compile and not decoder.compiled:
        print("compile: off (needs CUDA; decoding eagerly)")
    if args.cmd == "chat":
        return run_chat(args, decoder, tokenizer, cfg, context)
    run_generate(args, decoder, tokenizer, cfg, context)


if __name__ == "__main__":
    main()
