r"""
Supervised fine-tuning: full weights or LoRA (through peft), on the SFT token files of dataset_sft.py,
starting from any checkpoint folder (ours, or a Hugging Face Llama / GPT-NeoX folder).

    python fine_tuning.py --init_from out/pretrain --train_data data/sft_train --val_data data/sft_val \
        --out_dir out/sft --lora True --merge True
    torchrun --nproc_per_node 8 fine_tuning.py ...            # DDP
    deepspeed fine_tuning.py --use_deepspeed True ...          # DeepSpeed ZeRO (configs/ds_zero*.json)

Launchers, precision, the loop, checkpoints / resume, logging and SIGTERM handling are trainer.py's,
shared with pretrain.py. What is fine-tuning's own:
- the loss counts assistant tokens only (targets -100 elsewhere, see tokenizer.render_chat) and is the
  mean over every trained token of the global batch: trainer.py sums token losses over micro-batches and
  ranks and divides by the all-reduced token count, so a short reply weighs what each of its tokens weighs;
- LoRA (lora.py): W x + (alpha / r) * B A x, only A and B train. Checkpoints hold the adapter only, in
  peft's format, loadable by any peft user onto the base; --merge also writes W + (alpha / r) B A as a
  plain checkpoint folder (out_dir/merged);
- long context: --rope_scaling (linear / dynamic / yarn) with a longer --max_seq_len, and LongLoRA's
  shifted sparse attention (--s2_attn, lora.py) while training.
"""
import json
import os

import torch

import cli
import lora
from checkpoint import model_folder
from distributed import print0, setup_distributed
from sft_data import SFTDataset
from tokenizer import Tokenizer
from tokens import check_model_tokenizer
from trainer import add_train_args, seed_everything, train


# ----------------------------------------------------------------------------- data

class SFTBatches:
    """trainer.py's data contract (get_batch(step, rows), a function of (step, rows) only) on top of
    sft_data.SFTDataset: the rows of epochs 0, 1, 2, ... (each a fresh seeded shuffle) form one
    endless sequence, and global row r of step s is its row s * rows_per_step + r."""

    def __init__(self, path, max_seq_len, mode, rows_per_step, seed, vocab_size, tokenizer_hash, shuffle=True):
        # world_size 1: every rank sees all rows; the trainer picks this rank's rows of the global batch
        self.ds = SFTDataset(path, max_seq_len, mode=mode, shuffle=shuffle, seed=seed,
                             vocab_size=vocab_size, tokenizer_hash=tokenizer_hash)
        if len(self.ds) == 0:
            raise SystemExit(f"{path}: no sample fits in --max_seq_len {max_seq_len} (stats {self.ds.stats})")
        self.rows_per_step = rows_per_step
        self.rows_per_epoch = []  # rows per epoch (packing makes it vary a little with the shuffle)

    def locate(self, i):
        """(epoch, row within the epoch) of the i-th row of the endless sequence."""
        epoch = 0
        while True:
            if epoch == len(self.rows_per_epoch):
                self.rows_per_epoch.append(len(self.ds.epoch_rows(epoch)))
            if i < self.rows_per_epoch[epoch]:
                return epoch, i
            i -= self.rows_per_epoch[epoch]
            epoch += 1

    def get_batch(self, step, rows):
        out = []
        for r in rows:
            epoch, k = self.locate(step * self.rows_per_step + r)
            out.append(self.ds.make_row(self.ds.epoch_rows(epoch)[k]))
        return {key: torch.stack([row[key] for row in out]) for key in out[0]}


# ----------------------------------------------------------------------------- main

def get_parser():
    p = cli.parser(__doc__)
    g = p.add_argument_group("fine-tuning data")
    g.add_argument("--train_data", help="SFT token files of dataset_sft.py prepare (X.bin / X.json / X; "
                   "default: the newest `bash run.sh`'s, out/latest.json)")
    g.add_argument("--val_data", help="SFT validation token files ('none': no eval; default: the newest "
                   "`bash run.sh`'s when --train_data is not given either)")
    g.add_argument("--tokenizer", default=None, help="tokenizer the SFT files were made with (default: the one in --init_from)")
    g.add_argument("--sft_mode", default="packing", choices=["packing", "padding"],
                   help="several samples per row (attention stays within each) or one right-padded sample per row")
    cli.add_flag(g, "--merge", False, "after LoRA training also write the merged weights as a checkpoint folder")
    g.add_argument("--merge_dir", default=None, help="where --merge writes (default: OUT_DIR/merged)")
    lora.add_args(p)
    add_train_args(p)
    p.set_defaults(**lora.FINETUNE_DEFAULTS)
    return p


def resolve_paths(args):
    """Flags left out default to what the newest `bash run.sh` made (out/latest.json); a step_N/ checkpoint of
    a trainer run names its model/ folder."""
    if args.train_data is None:
        args.train_data = cli.pipeline_path("sft_train", "--train_data")
        args.val_data = args.val_data or cli.pipeline_path("sft_val", "--val_data", required=False)
    args.val_data = None if args.val_data == "none" else args.val_data
    args.init_from = model_folder(args.init_from or cli.pipeline_path("pretrain", "--init_from"))


def check_args(args):
    if args.s2_attn and args.sft_mode != "padding":
        raise SystemExit("--s2_attn: needs --sft_mode padding (shifted groups would cross packed samples)")
    if args.merge and not args.lora:
        raise SystemExit("--merge: only with --lora True (full fine-tuning already writes plain weights)")
    lora.check_args(args)


def load_data(args, tokenizer, max_seq_len, world_size):
    """Training and validation rows (SFTBatches; validation None without --val_data)."""
    rows_per_step = args.batch_size * args.grad_accum * world_size
    data = dict(max_seq_len=max_seq_len, seed=args.seed, vocab_size=tokenizer.vocab_size,
                tokenizer_hash=tokenizer.file_hash)
    train_data = SFTBatches(args.train_data, mode=args.sft_mode, rows_per_step=rows_per_step, **data)
    val_data = SFTBatches(args.val_data, mode=args.sft_mode, rows_per_step=rows_per_step, shuffle=False,
                          **data) if args.val_data else None
    return train_data, val_data


@cli.boundary
def main(argv=None):
    args = get_parser().parse_args(argv)
    resolve_paths(args)
    check_args(args)
    cli.check_out_dir(args.out_dir, "--out_dir")
    dist = setup_distributed(args)
    seed_everything(args.seed)
    model, peft_model = lora.build_model(args, dist.device)  # first: it names a --init_from that is no checkpoint
    tokenizer = Tokenizer(args.tokenizer or args.init_from)
    check_model_tokenizer(args.init_from, tokenizer.file_hash)  # the SFT ids must mean what the base's ids mean
    T = model.args.max_seq_len
    if tokenizer.vocab_size > model.args.vocab_size:
        raise SystemExit(f"--tokenizer {tokenizer.path}: vocab_size {tokenizer.vocab_size} exceeds the model's "
                         f"{model.args.vocab_size}")
    kw = {}
    if peft_model is not None:  # checkpoints hold the adapter only
        kw = {"save_model": lambda m, folder, tok: lora.save_adapter(peft_model, folder),
              "load_model": lambda m, folder: lora.load_adapter(peft_model, folder)}
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"base: {args.init_from}\nmax_seq_len: {T}\nrope_scaling: {json.dumps(model.args.rope_scaling)}\n"
           f"trainable_params: {n_train}\nall_params: {model.num_params()}")
    train_data, val_data = load_data(args, tokenizer, T, dist.world_size)
    print0(f"train_samples: {train_data.ds.stats['samples']}\ntrain_rows_per_epoch: {len(train_data.ds)}")

    tokenizer_path = args.tokenizer or args.init_from  # a folder: all its tokenizer files are copied
    result = train(args, model, train_data, val_data, tokenizer_path=tokenizer_path, **kw)
    if args.lora and args.merge and dist.is_main:
        merge_dir = args.merge_dir or os.path.join(args.out_dir, "merged")
        lora.merge_adapter(args.init_from, args.out_dir, merge_dir, tokenizer_path, max_seq_len=args.max_seq_len,
                           rope_scaling=args.rope_scaling, attn_impl=args.attn_impl)
        result["merged"] = merge_dir
    for k, v in result.items():
        print0(f"{k}: {v}")
    return result


if __name__ == "__main__":
    main()
