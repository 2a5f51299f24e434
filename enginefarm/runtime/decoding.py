"""How an engine picks its next tokens: greedy, sampling, beam search.

One decoding loop for every engine kind. An engine gives it the first
logits of a batch (after its prefill) and a `step(tokens, rows)` that feeds
one token per live row and returns the next logits, with `rows` the rows
whose caches each new row continues (beam search reorders them); the loop
does the rest.

- **Sampling** (`do_sample`): repetition penalty, then temperature, top-k
  and top-p, in the order and with the arithmetic of Hugging Face's logits
  processors (`RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`,
  `TopKLogitsWarper`, `TopPLogitsWarper`), then one draw per row from a
  generator seeded with `seed` (the same seed, the same tokens).
- **Beam search** (`num_beams` > 1): Hugging Face `generate`'s beam search
  with its defaults (early_stopping False: a request stops when no running
  beam can beat its worst finished one; finished scores are sum of log
  probabilities / generated length ** length_penalty; 2 x num_beams
  candidates a step, so that num_beams survive an end-of-sequence). The best
  beam is returned.
- **Stop strings and streaming** belong to the caller, which knows the
  tokenizer: `on_token(row, token)` is called for each new token of each
  request in order (greedy and sampling; beam search calls it once per
  token of the returned beam at the end), and returning True from it ends
  that request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import BadInput

NEG = -1.0e9  # what Hugging Face adds to rule a candidate out


class Decoding(BaseModel):
    """The decoding options of one request (all prompts of one call)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0: no top-k filter")
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    num_beams: int = Field(1, ge=1)
    length_penalty: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return not self.do_sample and self.num_beams == 1 and self.repetition_penalty == 1.0

    def check(self, max_beam_width: int) -> None:
        if self.num_beams > max_beam_width:
            raise BadInput(f"num_beams {self.num_beams}, but the engine was built for max_beam_width "
                           f"{max_beam_width} (limits.max_beam_width)")
        if self.do_sample and self.num_beams > 1:
            raise BadInput("beam search with sampling is not supported: pick num_beams > 1 or do_sample")


GREEDY = Decoding()


# ----------------------------------------------------------------------------- logits processing


def repetition_penalty(scores: torch.Tensor, history: list[list[int]], penalty: float) -> torch.Tensor:
    """Each row's scores of the tokens it has seen (prompt and output):
    divided by the penalty where positive, multiplied where negative."""
    if penalty == 1.0:
        return scores
    out = scores.clone()
    V = scores.shape[-1]
    for r, seen in enumerate(history):
        seen = {t for t in seen if 0 <= t < V}  # prompt-table rows (ids past the vocabulary) are no tokens
        if not seen:
            continue
        idx = torch.tensor(sorted(seen), dtype=torch.long, device=scores.device)
        s = out[r, idx]
        out[r, idx] = torch.where(s < 0, s * penalty, s / penalty)
    return out


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add
    up to more than p (at least one)."""
    if p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - p)
    drop[..., -1:] = False  # the most likely token stays
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def process(scores: torch.Tensor, history: list[list[int]], d: Decoding) -> torch.Tensor:
    """The scores a token is drawn (or picked) from: [rows, vocab] float32."""
    scores = repetition_penalty(scores.float(), history, d.repetition_penalty)
    if d.do_sample:
        if d.temperature != 1.0:
            scores = scores / d.temperature
        scores = top_p_filter(top_k_filter(scores, d.top_k), d.top_p)
    return scores


# ----------------------------------------------------------------------------- the loop


Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens [N, 1], rows [N]) -> logits [N, vocab]
OnToken = Callable[[int, int], Optional[bool]]  # (request, token) -> True: that request is done


def decode(first: torch.Tensor, step: Step, prompts: list[list[int]], max_new_tokens: int,
           eos_token_id: Optional[int], d: Decoding = GREEDY, on_token: Optional[OnToken] = None) -> list[list[int]]:
    """The new tokens of each request. first: [B, vocab] logits after each
    prompt; prompts: what each request has seen so far (the repetition
    penalty counts it)."""
    if d.num_beams > 1:
        return replay(_beam_search(first, step, prompts, max_new_tokens, eos_token_id, d), on_token)
    gen = None
    if d.do_sample:  # a generator of its own: a seed repeats the draws, whatever else uses torch's
        gen = torch.Generator(device="cpu")
        if d.seed is not None:
            gen.manual_seed(d.seed)
        else:
            gen.seed()
    B = first.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    logits = first
    rows = torch.arange(B)
    for i in range(max_new_tokens):
        history = [prompts[r] + out[r] for r in range(B)]
        scores = process(logits.float().cpu(), history, d)
        if d.do_sample:
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=gen)[:, 0]
        else:
            nxt = scores.argmax(-1)
        for r in range(B):
            if done[r]:
                continue
            t = int(nxt[r])
            out[r].append(t)
            if (eos_token_id is not None and t == eos_token_id) or (on_token and on_token(r, t)):
                done[r] = True
        if all(done) or i == max_new_tokens - 1:
            break
        logits = step(nxt[:, None], rows)
    return out


def replay(out: list[list[int]], on_token: Optional[OnToken]) -> list[list[int]]:
    """Tell on_token each finished output's tokens (for decoders that know
    their tokens only at the end: beam search, TensorRT-LLM's runner)."""
    if on_token:
        for r, toks in enumerate(out):
            for t in toks:
                if on_token(r, t):
                    break
    return out


@dataclass
class _Beams:
    """One request's beams: the running ones and the best finished ones."""

    running: list[list[int]]  # num_beams token lists (generated part only)
    scores: torch.Tensor  # [num_beams] sum of log probs of each running beam
    finished: list[tuple[float, list[int]]]  # (score with length penalty, tokens), best first, at most num_beams
    open: bool = True  # False: no running beam can beat the worst finished one


def _beam_search(first: torch.Tensor, step: Step, prompts: list[list[int]], max_new_tokens: int,
                       eos: Optional[int], d: Decoding) -> list[list[int]]:
    """Beam search for B requests at once: B x num_beams rows after the
    first step (the engine's caches are expanded and reordered through
    step's `rows`: row i of the next call continues row rows[i] of the last)."""
    B, V = first.shape
    nb = d.num_beams
    keep = max(2, 1 + (eos is not None)) * nb  # candidates a step
    lp = d.length_penalty
    beams = [_Beams([[] for _ in range(nb)], torch.tensor([0.0] + [NEG] * (nb - 1)), []) for _ in range(B)]
    logits = first.float().cpu().repeat_interleave(nb, dim=0)  # [B*nb, V]: beam j of request b at b*nb + j
    src_rows = torch.arange(B).repeat_interleave(nb)  # the rows the first step's caches come from
    for i in range(max_new_tokens):
        history = [prompts[b] + beams[b].running[j] for b in range(B) for j in range(nb)]
        logp = process(torch.log_softmax(logits, dim=-1), history, Decoding(repetition_penalty=d.repetition_penalty))
        nxt_tokens, nxt_rows = [], []
        last = i == max_new_tokens - 1
        for b, bm in enumerate(beams):
            acc = (logp[b * nb:(b + 1) * nb] + bm.scores[:, None]).reshape(-1)
            top_s, top_i = torch.topk(acc, keep)
            src, tok = top_i // V, top_i % V
            gen_len = i + 1
            cand = [(float(top_s[k]), int(src[k]), int(tok[k])) for k in range(keep)]
            # finished now: an end-of-sequence token, or the last step (the length limit)
            hits = [last or (eos is not None and t == eos) for _, _, t in cand]
            if bm.open:  # only the first num_beams candidates may finish, as in HF
                for k in range(nb):
                    if hits[k]:
                        s, j, t = cand[k]
                        bm.finished.append((s / (gen_len ** lp), bm.running[j] + [t]))
                bm.finished.sort(key=lambda x: -x[0])
                del bm.finished[nb:]
            live = sorted(range(keep), key=lambda k: -(cand[k][0] + (NEG if hits[k] else 0.0)))[:nb]
            bm.running = [bm.running[cand[k][1]] + [cand[k][2]] for k in live]
            bm.scores = torch.tensor([cand[k][0] + (NEG if hits[k] else 0.0) for k in live])
            nxt_tokens += [cand[k][2] for k in live]
            nxt_rows += [b * nb + cand[k][1] for k in live]
            # can a running beam still beat the worst finished one? (HF's heuristic, early_stopping False)
            if bm.open and len(bm.finished) == nb:
                best_possible = float(bm.scores[0]) / (gen_len ** lp)
                bm.open = best_possible > bm.finished[-1][0]
        if last or not any(bm.open for bm in beams):
            break
        rows = torch.tensor(nxt_rows) if i else src_rows[torch.tensor(nxt_rows)]
        logits = step(torch.tensor(nxt_tokens)[:, None], rows).float().cpu()
    return [bm.finished[0][1] if bm.finished else bm.running[0] for bm in beams]


# ----------------------------------------------------------------------------- text: stop strings, streaming


def options(**given) -> Decoding:
    """Decoding from keyword options (None: the default); BadInput naming a bad one."""
    from pydantic import ValidationError

    try:
        return Decoding(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        raise BadInput(f"decoding option {'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None


class TextWatch:
    """The on_token of a call that knows its tokenizer: ends a request at
    the first stop string in its text, and streams each request's new text
    as it comes (`stream(request, text)`), holding back a tail that may be
    the start of a stop string until it is known not to be (`flush()` sends
    what is left at the end). `text(r)` and `ids(r)`: the output up to (not
    including) the stop string."""

    def __init__(self, n: int, detokenize: Callable[[list[int]], str], stop: tuple[str, ...] = (),
                 stream: Optional[Callable[[int, str], None]] = None):
        self.detok, self.stop, self.stream = detokenize, tuple(s for s in stop if s), stream
        self._ids: list[list[int]] = [[] for _ in range(n)]
        self._cut: list[Optional[int]] = [None] * n  # where a stop string starts in the text
        self._sent = [0] * n

    def _held(self, text: str) -> int:
        """How many characters at the end of text may begin a stop string."""
        return max((k for s in self.stop for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)

    def __call__(self, r: int, token: int) -> bool:
        if self._cut[r] is not None:
            return True
        self._ids[r].append(token)
        text = self.detok(self._ids[r])
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self._cut[r] = min(hits)
        upto = self._cut[r] if self._cut[r] is not None else len(text) - self._held(text)
        self._send(r, text, upto)
        return self._cut[r] is not None

    def _send(self, r: int, text: str, upto: int) -> None:
        if self.stream and upto > self._sent[r]:
            self.stream(r, text[self._sent[r]:upto])
            self._sent[r] = upto

    def flush(self) -> None:
        for r, ids in enumerate(self._ids):
            text = self.detok(ids)
            self._send(r, text, self._cut[r] if self._cut[r] is not None else len(text))

    def text(self, r: int, ids: list[int]) -> str:
        text = self.detok(ids)
        cut = self._cut[r]
        return text if cut is None else text[:cut]

    def ids(self, r: int, ids: list[int]) -> list[int]:
        """The output ids up to the token that completed the stop string."""
        return ids[:len(self._ids[r])] if self._cut[r] is not None else ids
