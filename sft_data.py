"""SFTDataset: the training rows of an SFT token file (tokens + loss mask, written by dataset_sft.py).

A row's targets are the next token where that token is trained: targets[t] = ids[t+1] if mask[t+1]
else -100. So the FIRST reply token is trained (predicted from <|assistant|>), the model learns to close
its reply with <|end|>, and nothing of the prompt ever counts in the loss. Rows are padded (one sample
each) or packed (whole samples spliced together, with doc_ids and position_ids that keep them apart).
"""
import numpy as np
import torch

from tokens import check_token_file, load_token_file


def fit_turns(mask: np.ndarray, budget: int) -> int:
    """Length of the longest prefix made of whole turns that fits in `budget` tokens (0: not even one reply).

    A turn ends with its reply's <|end|>: the last token of each run of 1s in the mask.
    """
    turn_ends = np.flatnonzero((mask == 1) & (np.append(mask[1:], 0) == 0)) + 1
    fits = turn_ends[turn_ends <= budget]
    return int(fits[-1]) if len(fits) else 0


class SFTDataset(torch.utils.data.IterableDataset):
    """Rows of max_seq_len tokens from an SFT token file, one epoch per `iter()`; resumable.

    mode="padding": one sample per row, right-padded (causal attention never looks at the pads).
    mode="packing": whole samples spliced into rows; each row also carries doc_ids (which sample a
        token belongs to: model.py attends only within equal doc_ids = reset_mask) and position_ids
        restarting at 0 in each sample (= reset_position_ids), so a packed sample computes exactly
        what it computes alone in a padded row.
    A sample keeps its trailing EOS, so attention.doc_ids_from_eos(input_ids) gives the same doc_ids
    (when pad_id != eos_id, as with our tokenizer; the pads then form one last document).
    A sample longer than a row keeps its whole turns from the start; one whose first reply does not
    fit is dropped (counts in .stats). Each epoch is a fresh seeded shuffle; rank r of world_size
    takes rows r, r + world_size, ... (the same number on every rank). state_dict() is the position.
    Use it in the training process itself (DataLoader num_workers=0): rows are cheap memmap slices,
    and the position must be counted where the rows are consumed.
    """

    def __init__(self, path: str, max_seq_len: int, mode: str = "packing", shuffle: bool = True, seed: int = 1337,
                 rank: int = 0, world_size: int = 1, vocab_size: int | None = None, tokenizer_hash: str | None = None):
        if mode not in ("padding", "packing"):
            raise ValueError(f"mode must be 'padding' or 'packing', got {mode!r}")
        self.ids, meta = load_token_file(path)
        if vocab_size is not None:
            check_token_file(meta, vocab_size, tokenizer_hash, path=path)
        if "mask" not in meta.get("arrays", {}):
            raise SystemExit(f"{path}: no loss mask; SFT token files are written by dataset_sft.py prepare")
        self.mask, _ = load_token_file(path, array="mask")
        if not isinstance(meta.get("eos_id"), int):
            raise SystemExit(f"{path}: its meta has no eos_id; SFT token files are written by dataset_sft.py prepare")
        self.eos_id, self.pad_id = meta["eos_id"], meta.get("pad_id", meta["eos_id"])
        self.max_seq_len, self.mode, self.shuffle, self.seed = max_seq_len, mode, shuffle, seed
        self.rank, self.world_size = rank, world_size

        if len(self.ids) and self.ids[-1] != self.eos_id:
            raise SystemExit(f"{path}: does not end with EOS (id {self.eos_id}); not an SFT token file of dataset_sft.py")
        # samples end at EOS; each keeps n tokens before its EOS, so it takes n + 1 places in a row
        ends = np.flatnonzero(self.ids == self.eos_id)
        self.starts = np.concatenate([[0], ends + 1])[:-1].astype(np.int64)
        self.lens = ends - self.starts
        overlong = np.flatnonzero(self.lens + 1 > max_seq_len)
        for i in overlong:
            self.lens[i] = fit_turns(np.asarray(self.mask[self.starts[i]: ends[i]]), max_seq_len - 1)
        self.kept = np.flatnonzero(self.lens > 0)
        self.stats = {"samples": len(ends), "truncated": int((self.lens[overlong] > 0).sum()),
                      "dropped": len(ends) - len(self.kept)}
        self.epoch, self.rows_seen = 0, 0  # rows_seen: rows of this epoch taken by all ranks together
        self._rows_cache = {}  # epoch -> rows, for the last two epochs (a batch may straddle an epoch boundary)

    def epoch_rows(self, epoch: int) -> list[np.ndarray]:
        """This rank's rows for `epoch`, each an array of sample indices."""
        if epoch in self._rows_cache:
            return self._rows_cache[epoch]
        order = self.kept
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        if self.mode == "padding":
            rows = [order[k: k + 1] for k in range(len(order))]
        else:  # greedy: fill a row with samples in order until the next one does not fit
            rows, row, used = [], [], 0
            for i in order:
                if used + self.lens[i] + 1 > self.max_seq_len:
                    rows.append(np.array(row))
                    row, used = [], 0
                row.append(i)
                used += self.lens[i] + 1
            if row:
                rows.append(np.array(row))
        # every rank gets the same number of rows, or the ranks' step counts (and all-reduces) diverge
        n = len(rows) // self.world_size * self.world_size
        self._rows_cache = {e: r for e, r in self._rows_cache.items() if e == epoch - 1}
        self._rows_cache[epoch] = rows[self.rank: n: self.world_size]
        return self._rows_cache[epoch]

    def __len__(self):
        """Rows this rank yields in the current epoch."""
        return len(self.epoch_rows(self.epoch))

    def make_row(self, samples) -> dict:
        """Splice samples (indices) into one row of max_seq_len tokens with next-token targets."""
        T = self.max_seq_len
        input_ids = np.full(T, self.pad_id, dtype=np.int64)
        targets = np.full(T, -100, dtype=np.int64)
        doc_ids = np.zeros(T, dtype=np.int64)
        position_ids = np.zeros(T, dtype=np.int64)
        t = 0
        for d, i in enumerate(samples):
            s, n = self.starts[i], self.lens[i]
            ids, mask = self.ids[s: s + n].astype(np.int64), self.mask[s: s + n]
            input_ids[t: t + n], input_ids[t + n] = ids, self.eos_id
            # targets[t] = ids[t+1] if mask[t+1]: the reply's first token is predicted from <|assistant|>,
            # and nothing crosses into the next sample (this sample's last target predicts its EOS: -100)
            targets[t: t + n - 1] = np.where(mask[1:] == 1, ids[1:], -100)
            doc_ids[t: t + n + 1] = d
            position_ids[t: t + n + 1] = np.arange(n + 1)
            t += n + 1
        # the pads form one more "document" of their own, as doc_ids_from_eos sees them
        doc_ids[t:], position_ids[t:] = len(samples), np.arange(T - t)
        row = {"input_ids": torch.from_numpy(input_ids), "targets": torch.from_numpy(targets)}
        if self.mode == "packing":
            row.update(doc_ids=torch.from_numpy(doc_ids), position_ids=torch.from_numpy(position_ids))
        return row

    def __iter__(self):
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("SFTDataset counts its position where rows are consumed: use DataLoader(num_workers=0)")
        rows = self.epoch_rows(self.epoch)
        for k in range(self.rows_seen // self.world_size, len(rows)):
            self.rows_seen = (k + 1) * self.world_size
            yield self.make_row(rows[k])
        self.epoch, self.rows_seen = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "rows_seen": self.rows_seen, "seed": self.seed, "mode": self.mode,
                "max_seq_len": self.max_seq_len}

    def load_state_dict(self, state: dict):
        for key in ("seed", "mode", "max_seq_len"):
            if state[key] != getattr(self, key):
                raise SystemExit(f"cannot resume SFT data: checkpoint has {key}={state[key]!r}, this run {getattr(self, key)!r}")
        # rows_seen counts rows of all ranks, so a resume with another world_size starts at the same place
        self.epoch, self.rows_seen = state["epoch"], state["rows_seen"]
