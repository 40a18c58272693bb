"""The inference engine eval.py's subcommands run: a checkpoint loaded, then prompts in, new ids out.

  loading        load_model (+ a LoRA adapter merged), load_tokenizer
  logits         repetition penalty and bad words (HF semantics); temperature/top-k/top-p are model.sample
  Decoder        the static KV cache and the one-token step (compiled, a CUDA graph, fast_decode's kernels)
  generate       the greedy / sampling loop with stop ids, stop strings and streaming; beam search

Decoding runs on model.py's static KV cache. The one-token step has fixed shapes (the cache slot is a
tensor), so on a GPU `compile=True` records it as a CUDA graph (gpt-fast style): one graph replay per token
instead of hundreds of kernel launches. The step inside is fast_decode.py's Triton kernels for a Llama, or
the model's forward under torch.compile(mode="reduce-overhead"); both have the contract of the forward,
(tokens, cache, cache_pos) -> logits of the new token. On the CPU the same loop runs eagerly.
`model.generate` is the plain reference loop this engine is tested against.
"""
import itertools
import os
import secrets
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fast_decode
from checkpoint import model_folder
from lora import merge_lora
from model import Transformer, sample
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------- loading

def load_model(path, adapter=None, device="cpu", dtype=torch.float32, **overrides):
    """Transformer.from_pretrained(path) (our folder, an HF folder, or a GPTQ folder), optionally with a
    LoRA adapter folder merged into the weights (lora.merge_lora: W' = W + (alpha/r) B A, so decoding pays
    nothing). overrides: ModelArgs fields to change (rope_scaling, attn_impl)."""
    model = Transformer.from_pretrained(path, dtype=dtype, **overrides)
    if adapter:
        model = merge_lora(model, adapter)
    return model.to(device).eval()


def load_tokenizer(model_path, adapter=None, tokenizer=None) -> Tokenizer:
    """--tokenizer, else the one saved beside the adapter, else the one in the model folder."""
    if tokenizer:
        return Tokenizer(tokenizer)
    model_path = model_folder(model_path)  # a trainer's step_N/ keeps the folder in model/
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise SystemExit(f"--model {model_path}: no config.json (not a checkpoint folder)")
    for folder in (adapter, model_path):
        if folder and any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.model", "tokenizer.json")):
            return Tokenizer(folder)
    raise SystemExit(f"{model_path}: no tokenizer.model / tokenizer.json in the folder; pass --tokenizer")


# ----------------------------------------------------------------------------- logits processing

def apply_repetition_penalty(logits, history, penalty, history_mask=None):
    """CTRL's penalty (Keskar et al. 2019), as transformers' RepetitionPenaltyLogitsProcessor: a token seen in
    `history` has its logit l divided by the penalty if l > 0 and multiplied by it if l < 0 (so it always
    gets less likely for penalty > 1), once however often it occurred. Padding (history_mask 0) is not
    history."""
    seen = torch.zeros_like(logits, dtype=torch.bool)
    if history_mask is not None:
        history = history.masked_fill(~history_mask.bool(), 0)
        seen.scatter_(1, history, history_mask.bool())
    else:
        seen.scatter_(1, history, True)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_bad_words(logits, history, bad_words_ids):
    """A bad word is a token sequence w: its last token is banned (-inf) whenever the context ends with
    w[:-1] (always for a one-token word), so it can never be completed (HF NoBadWordsLogitsProcessor)."""
    logits = logits.clone()
    for word in bad_words_ids:
        prefix = word[:-1]
        if len(prefix) > history.shape[1]:
            continue
        if prefix:
            rows = (history[:, -len(prefix):] == torch.tensor(prefix, device=history.device)).all(dim=1)
        else:
            rows = torch.ones(history.shape[0], dtype=torch.bool, device=history.device)
        logits[rows, word[-1]] = float("-inf")
    return logits


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: a finished beam scores sum(log p) / generated_len ** length_penalty
    early_stopping: bool | str = False  # beam search: True | False | "never", as transformers
    stop_ids: list = field(default_factory=list)
    stop_strings: list = field(default_factory=list)
    bad_words_ids: list = field(default_factory=list)


def process_logits(logits, history, history_mask, cfg: GenerationConfig):
    """The penalties that depend on what came before (applied before temperature / top-k / top-p)."""
    if cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty, history_mask)
    if cfg.bad_words_ids:
        logits = apply_bad_words(logits, history, cfg.bad_words_ids)
    return logits


# ----------------------------------------------------------------------------- the decoder

def left_pad(prompts, pad_id):
    """list of id lists -> (B, T) ids right-aligned (padding on the left) and the (B, T) 1/0 attention mask.
    Left padding puts every row's last prompt token in the same column, so one decode step serves all rows."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids, mask


class Decoder:
    """Owns the model's static KV cache and the one-token step. With compile=True (CUDA only) the step runs
    as a CUDA graph, recorded once and replayed each token, so that the GPU does not wait on Python between
    its hundreds of small kernels (gpt-fast style). The graph needs fixed shapes and fixed addresses: the
    cache slot comes in as a tensor, the cache length is rounded up to a bucket (chats of similar length
    share one graph), and the cache tensors are updated in place. The step itself is either
      - kernels_step: fast_decode's Triton kernels (five per layer), for a Llama with plain weights at
        batch <= fast_decode.MAX_BATCH, recorded with torch.cuda.graph; or
      - forward_step: the model's forward under torch.compile(mode="reduce-overhead"): inductor fuses the
        small ops and records the graph itself (any model, any batch size; kernels=False: always).
    Greedy decoding on the kernels also records its pick in the graph (greedy_steps). The prompt pass is
    compiled too (compile_prefill)."""

    def __init__(self, model, compile=False, bucket=256, kernels=True):
        self.model, self.bucket = model, bucket
        self.compiled = compile and next(model.parameters()).is_cuda
        self.kernels = self.compiled and kernels and fast_decode.supported(model)
        self._graphs = {}  # the kernels' step recorded, per greedy True/False (_kernels_graph)
        if self.compiled:
            # as gpt-fast: tune the block sizes of inductor's kernels, most of which read a weight matrix
            # once for a single token (memory-bound); see docs/2026-12-06-log.md
            torch._inductor.config.coordinate_descent_tuning = True
        self._compiled_step = (torch.compile(self.forward_step, mode="reduce-overhead", fullgraph=True,
                                             dynamic=False) if self.compiled else None)
        self._compiled_prefill = self.compile_prefill(self._prefill) if self.compiled else None
        self.cache = None

    def compile_prefill(self, prefill):
        """The prompt pass compiled: eager, its few hundred small kernels are launched one by one from
        Python. Prompt lengths vary, so after the second length dynamo compiles one graph with a symbolic
        length; reduce-overhead records each prompt shape as a CUDA graph the second time it is seen
        (inductor's cudagraph trees: one compiled graph, one recording per shape)."""
        return torch.compile(prefill, mode="reduce-overhead")

    def forward_step(self, tokens, cache, cache_pos):
        # one query against the cache is a matrix-vector product: plain math attention lets inductor fuse it
        # with its neighbours, where a fused-attention library call (cuDNN / efficient) costs more than it does
        with sdpa_kernel(SDPBackend.MATH):
            return self.model(tokens, cache=cache, cache_pos=cache_pos)[:, -1]

    def kernels_step(self, tokens, cache, cache_pos):
        """forward_step as fast_decode's Triton kernels."""
        return fast_decode.decode_step(self.model, tokens, cache, cache_pos)

    def kernels_pick(self, logits, out, record):
        """The greedy pick recorded after kernels_step (fast_decode.argmax)."""
        return fast_decode.argmax(logits, out=out, record=record)

    def step(self, tokens, cache, cache_pos):
        """Logits (B, vocab) of one new token per row, written to cache slot cache_pos (a 1-element tensor).
        With compile=True they live in the graph's output buffer, overwritten by the next step."""
        if not self.compiled:
            return self.forward_step(tokens, cache, cache_pos)
        if self.kernels and tokens.shape[0] <= fast_decode.MAX_BATCH:
            return self._kernels_step(tokens, cache, cache_pos)
        # a new replay overwrites the previous step's output buffers: tell the graph manager that the
        # caller is done with them (it has already sampled from those logits)
        torch.compiler.cudagraph_mark_step_begin()
        return self._compiled_step(tokens, cache, cache_pos)

    def _kernels_step(self, tokens, cache, cache_pos):
        graph, (tokens_in, pos_in), logits = self._kernels_graph(cache, tokens, cache_pos, greedy=False)
        tokens_in.copy_(tokens)
        pos_in.copy_(cache_pos)
        graph.replay()
        return logits

    def _kernels_graph(self, cache, tokens, cache_pos, greedy):
        """kernels_step on this cache recorded as a CUDA graph that reads its token and slot from fixed
        buffers; returns (graph, (token buffer, slot buffer), output). With greedy the pick is recorded too:
        the argmax goes back into the token buffer (the next replay's input) and into picks[slot], and the
        slot moves on, so replays can follow each other with nothing in between; the output is picks.
        Recorded on the first step on a cache (new_cache hands the same one back while the shape fits)."""
        if greedy in self._graphs and self._graphs[greedy][0] is cache:
            return self._graphs[greedy][1:]
        tokens_in, pos_in = tokens.clone(), cache_pos.clone()
        # greedy: the picks by slot, and the argmax kernel's count of rows done
        picks = torch.zeros(cache.max_len, tokens.shape[0], dtype=torch.long, device=tokens.device)
        arrived = torch.zeros(1, dtype=torch.int32, device=tokens.device)

        def step():
            logits = self.kernels_step(tokens_in, cache, pos_in)
            if not greedy:
                return logits
            self.kernels_pick(logits, out=tokens_in, record=(picks, pos_in, arrived))
            return picks

        # run the step for real once on a side stream, which compiles the Triton kernels (recording runs
        # nothing). It writes this token's keys and values to its slot: the replay that follows writes the same.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        tokens_in.copy_(tokens)
        pos_in.copy_(cache_pos)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        self._graphs[greedy] = (cache, graph, (tokens_in, pos_in), out)
        return self._graphs[greedy][1:]

    def picks_in_graph(self, batch_size):
        """Whether greedy_steps can run: the step is fast_decode's kernels at this batch size."""
        return self.kernels and batch_size <= fast_decode.MAX_BATCH

    def greedy_steps(self, tokens, cache, slot, n):
        """Greedy decoding's next n steps after `tokens` (B, 1) at cache slot `slot` (an int), each yielded as
        a list of B picked ids. The pick is part of the recorded step (_kernels_graph), so the GPU replays
        step after step; after each replay a side stream copies that step's picks to the host, and the host
        reads them while the next step runs (a stop found there leaves one wasted step at most)."""
        slot_t = torch.tensor([slot], device=tokens.device)
        graph, (tokens_in, pos_in), picks = self._kernels_graph(cache, tokens, slot_t, greedy=True)
        tokens_in.copy_(tokens)
        pos_in.fill_(slot)
        host = torch.empty(picks.shape, dtype=picks.dtype, pin_memory=True)
        copier, copied = torch.cuda.Stream(), []
        for s in range(slot, slot + n):
            graph.replay()
            stepped = torch.cuda.Event()
            stepped.record()
            with torch.cuda.stream(copier):
                copier.wait_event(stepped)
                host[s].copy_(picks[s], non_blocking=True)
                copied.append(torch.cuda.Event())
                copied[-1].record()
            if len(copied) > 1:
                copied[-2].synchronize()
                yield host[s - 1].tolist()
        if copied:
            copied[-1].synchronize()
            yield host[slot + n - 1].tolist()

    def new_cache(self, batch_size, length):
        """A cache of >= length slots, reused (zeroed) when the shape matches: the CUDA graph recorded for
        it stays valid."""
        max_len = min(-(-length // self.bucket) * self.bucket, max(length, self.model.args.max_seq_len))
        c = self.cache
        if c is not None and c.k[0].shape[0] == batch_size and c.max_len == max_len:
            c.valid.zero_()  # stale keys/values behind valid=False are never attended to
            return c
        self.cache = c = self.model.new_cache(batch_size, max_len)
        if self.compiled:
            for t in c.k + c.v + [c.valid]:
                torch._dynamo.mark_static_address(t)
        return c

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, max_new_tokens):
        """Run the prompts through the model, filling cache slots 0..T-1.
        Returns the last position's logits (B, vocab) and the cache."""
        B, T = input_ids.shape
        cache = self.new_cache(B, T + max_new_tokens)
        pos = torch.arange(T, device=input_ids.device)
        return (self._compiled_prefill or self._prefill)(input_ids, attention_mask, cache, pos), cache

    def _prefill(self, input_ids, attention_mask, cache, pos):
        return self.model(input_ids, attention_mask=attention_mask, cache=cache, cache_pos=pos)[:, -1]


# ----------------------------------------------------------------------------- stop strings, streaming

def stop_string_cut(text, stop_strings):
    """Index where the earliest stop string starts in text, or None."""
    hits = [text.find(s) for s in stop_strings if s and s in text]
    return min(hits) if hits else None


class Streamer:
    """Prints a row's new text as it is generated. The text is re-decoded from all new ids each time (a
    token may be half of a UTF-8 character, shown as U+FFFD until the rest arrives), and text that could
    still turn out to be the start of a stop string is held back until it cannot."""

    def __init__(self, tokenizer, stop_strings=(), out=sys.stdout):
        self.tokenizer, self.stop_strings, self.out, self.shown = tokenizer, list(stop_strings), out, 0

    def visible(self, text, final):
        cut = stop_string_cut(text, self.stop_strings)
        if cut is not None:
            return text[:cut]
        if final:
            return text
        text = text.rstrip("\ufffd")
        for s in self.stop_strings:  # hold back a suffix that is a prefix of a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    return text[:-k]
        return text

    def put(self, ids, final=False):
        text = self.visible(self.tokenizer.decode(ids), final)
        if len(text) > self.shown:
            self.out.write(text[self.shown:])
            self.out.flush()
            self.shown = len(text)


def finish_text(tokenizer, ids, cfg: GenerationConfig):
    """The text of new ids: cut at the first stop string, without a trailing stop token."""
    if ids and ids[-1] in cfg.stop_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids)
    cut = stop_string_cut(text, cfg.stop_strings)
    return text if cut is None else text[:cut]


def request_seed(seed):
    """Seed torch's generator for one request: the given seed, or a fresh random one (printed so the
    output can be reproduced with --seed)."""
    seed = secrets.randbits(31) if seed is None else seed
    torch.manual_seed(seed)
    return seed


# ----------------------------------------------------------------------------- generation

def start_copy_to_host(t):
    """Start copying t to the host; returns a function that waits for that copy alone (not for GPU work
    queued after it, as t.tolist() would) and gives t as a list."""
    if not t.is_cuda:
        return t.tolist
    host = t.to("cpu", non_blocking=True)  # into pinned memory, ordered after the kernels that made t
    copied = torch.cuda.Event()
    copied.record()
    return lambda: (copied.synchronize(), host.tolist())[1]


@torch.no_grad()
def generate(decoder, prompts, cfg: GenerationConfig, pad_id, tokenizer=None, streamer=None):
    """Sample (or greedily pick) up to cfg.max_new_tokens for each prompt (a list of id lists), as one
    left-padded batch. A row stops at a stop id (kept in its output) or once its decoded text contains a
    stop string (its text is cut there, its ids end at the token that completed it). Returns the new ids
    of each row. Sampling draws from torch's global generator: seed it for reproducible output."""
    if cfg.num_beams > 1 and cfg.max_new_tokens > 0:  # no step, no beam: nothing to search
        return beam_search(decoder, prompts, cfg, pad_id, tokenizer)
    device = next(decoder.model.parameters()).device
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompts, pad_id))
    B, T = input_ids.shape
    logits, cache = decoder.prefill(input_ids, attention_mask, cfg.max_new_tokens)
    done_t = torch.zeros(B, dtype=torch.bool, device=device)  # rows done, as the device knows it
    keep_history = cfg.repetition_penalty != 1.0 or bool(cfg.bad_words_ids)
    if cfg.temperature == 0.0 and not keep_history and cfg.max_new_tokens > 0 and decoder.picks_in_graph(B):
        # greedy with fast_decode's kernels: the picks happen inside the recorded step. Finished rows go on
        # feeding their own picks, which nobody reads (rows never see each other)
        first = fast_decode.argmax(logits)  # the kernel the recorded steps pick with (torch's argmax here costs more)
        ids_per_step = itertools.chain([first.tolist()],
                                       decoder.greedy_steps(first[:, None], cache, T, cfg.max_new_tokens - 1))
    else:
        ids_per_step = sampled_steps(decoder, logits, cache, input_ids, attention_mask, cfg, pad_id, done_t)
    return collect(ids_per_step, B, cfg, tokenizer, streamer, done_t)


def sampled_steps(decoder, logits, cache, input_ids, attention_mask, cfg, pad_id, done_t):
    """Each step's new ids as a host list, picked between two steps (sampling, penalties, or a step that
    is not fast_decode's). The next step is queued on the GPU before a step's ids are read back, so the
    device keeps working while the host does the bookkeeping of `collect`."""
    (B, T), device = input_ids.shape, input_ids.device
    # everything seen so far, for the repetition penalty and bad words; padding marked 0 in history_mask
    history = torch.cat([input_ids, torch.full((B, cfg.max_new_tokens), pad_id, device=device)], dim=1)
    history_mask = torch.cat([attention_mask, torch.ones(B, cfg.max_new_tokens, dtype=torch.long, device=device)], 1)
    keep_history = cfg.repetition_penalty != 1.0 or bool(cfg.bad_words_ids)
    # each small op below is a kernel between two decode steps: the ones that only matter with stop ids /
    # strings or penalties are skipped without them
    can_stop = bool(cfg.stop_ids or cfg.stop_strings)
    stop_t = torch.tensor(sorted(cfg.stop_ids), dtype=torch.long, device=device)
    pos = torch.tensor([T], device=device)
    for step in range(cfg.max_new_tokens):
        logits = process_logits(logits, history[:, :T + step], history_mask[:, :T + step], cfg)
        nxt = sample(logits, cfg.temperature, cfg.top_k, cfg.top_p)
        if can_stop:
            nxt.masked_fill_(done_t, pad_id)  # finished rows only feed padding
            done_t.logical_or_(torch.isin(nxt, stop_t))
        if keep_history:
            history[:, T + step] = nxt
        read_tokens = start_copy_to_host(nxt)
        if step + 1 < cfg.max_new_tokens:
            logits = decoder.step(nxt[:, None], cache, pos)
            pos += 1
        yield read_tokens()


def collect(ids_per_step, B, cfg, tokenizer, streamer, done_t):
    """The new ids of each of the B rows from the per-step lists, each row ending at its stop id or at the
    token that completes a stop string; streams row 0."""
    new_ids, done = [[] for _ in range(B)], [False] * B
    for step_ids in ids_per_step:
        for i, tok in enumerate(step_ids):
            if done[i]:
                continue
            new_ids[i].append(tok)
            if tok in cfg.stop_ids:
                done[i] = True
            elif cfg.stop_strings and stop_string_cut(tokenizer.decode(new_ids[i]), cfg.stop_strings) is not None:
                done[i] = done_t[i] = True  # rare: the only host-to-device write in the loop
        if streamer is not None:
            streamer.put(new_ids[0])
        if all(done):
            break
    if streamer is not None:
        streamer.put(new_ids[0], final=True)
    return new_ids


# ----------------------------------------------------------------------------- beam search

@torch.no_grad()
def beam_search(decoder, prompts, cfg: GenerationConfig, pad_id, tokenizer=None):
    """Beam search with transformers' rules, so the same model gives the same ids:
    - each of the K beams of a prompt expands to V tokens; candidates are ranked by the summed log-prob
      (after the penalties) and the best 2K are looked at, so K live beams remain even if many end;
    - a candidate that ends (stop id, stop string or the length limit) is kept as a finished hypothesis
      only if it ranks in the top K, with score sum(log p) / generated_len ** length_penalty; the best K
      finished hypotheses are kept;
    - the best K candidates that did not end live on; a prompt is done when no live beam can still beat
      its worst finished hypothesis (early_stopping False: judged at the current length; "never": at the
      longest possible length when length_penalty > 0; True: as soon as K hypotheses are finished).
    Returns the new ids of the best hypothesis per prompt."""
    K, device = cfg.num_beams, next(decoder.model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_id)
    # every prompt is repeated K times: row b*K + k is beam k of prompt b
    input_ids, attention_mask = (t.repeat_interleave(K, dim=0).to(device) for t in (input_ids, attention_mask))
    B, T = len(prompts), input_ids.shape[1]
    logits, cache = decoder.prefill(input_ids, attention_mask, cfg.max_new_tokens)
    history, history_mask = input_ids, attention_mask
    # all K beams start identical: only beam 0 may expand at first, else the top candidates would be K copies
    running = torch.zeros(B, K, device=device)
    running[:, 1:] = -1e9
    finished = [[] for _ in range(B)]  # per prompt: (score, new ids), best first, at most K
    done = [False] * B
    pos = torch.tensor([T], device=device)
    for step in range(cfg.max_new_tokens):
        gen_len = step + 1  # tokens generated once this step's token is appended
        logprobs = process_logits(F.log_softmax(logits, dim=-1), history, history_mask, cfg)
        V = logprobs.shape[-1]
        top_scores, top_idx = (logprobs.view(B, K, V) + running[:, :, None]).view(B, K * V).topk(2 * K, dim=1)
        top_beam, top_token = (top_idx // V).tolist(), (top_idx % V).tolist()
        candidates = [list(zip(*row)) for row in zip(top_scores.tolist(), top_beam, top_token)]  # (score, beam, token)
        new_ids_rows = history[:, T:].tolist()
        live = []
        for b in range(B):
            beams, finished[b], done[b] = beam_step(candidates[b], new_ids_rows[b * K:(b + 1) * K], finished[b],
                                                    done[b], gen_len, cfg, tokenizer)
            live += [(b * K + beam, tok, s) for s, beam, tok in beams]
        if all(done) or gen_len == cfg.max_new_tokens:
            break
        # the K survivors of each prompt become rows b*K..b*K+K-1: reorder the cache rows to their parents
        rows = torch.tensor([row for row, _, _ in live], device=device)
        for t in cache.k + cache.v + [cache.valid]:
            t.copy_(t.index_select(0, rows))
        tokens = torch.tensor([tok for _, tok, _ in live], device=device)
        history = torch.cat([history.index_select(0, rows), tokens[:, None]], dim=1)
        history_mask = torch.cat([history_mask.index_select(0, rows), torch.ones_like(tokens)[:, None]], dim=1)
        running = torch.tensor([s for _, _, s in live], device=device).view(B, K)
        logits = decoder.step(tokens[:, None], cache, pos)
        pos += 1
    return [hyps[0][1] for hyps in finished]


def beam_step(candidates, beam_ids, finished, done, gen_len, cfg: GenerationConfig, tokenizer=None):
    """One prompt's step of beam search. candidates: its 2K best (score, beam, token), best first; beam_ids:
    the new ids of its K beams; finished: its (score, ids) hypotheses, best first. Returns the K candidates
    that live on, the finished hypotheses with those that ended here, and whether the prompt is done."""
    K, live, ended = cfg.num_beams, [], []
    for rank, (s, beam, tok) in enumerate(candidates):
        ids = beam_ids[beam] + [tok]
        hit = (tok in cfg.stop_ids or gen_len == cfg.max_new_tokens or
               (cfg.stop_strings and stop_string_cut(tokenizer.decode(ids), cfg.stop_strings) is not None))
        if hit and rank < K:
            ended.append((s / gen_len ** cfg.length_penalty, ids))
        # an ended candidate can only go on (as a dead beam) if fewer than K others do
        live.append((s - 1e9 if hit else s, beam, tok))
    live = sorted(live, key=lambda c: -c[0])[:K]
    full = len(finished) == K and cfg.early_stopping is True
    if not done and not full and ended:
        finished = sorted(finished + ended, key=lambda h: -h[0])[:K]
    # can a live beam still beat the worst finished one? Its sum of log-probs only falls as it grows, so its
    # best score is at the current length (or at the longest one when length_penalty > 0 rewards length and
    # early_stopping is "never")
    if len(finished) == K and not done:
        best_len = cfg.max_new_tokens if (cfg.early_stopping == "never" and cfg.length_penalty > 0) else gen_len
        done = cfg.early_stopping is True or live[0][0] / best_len ** cfg.length_penalty <= finished[-1][0]
    return live, finished, done
