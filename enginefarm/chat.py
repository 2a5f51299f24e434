"""`enginefarm chat`: a conversation with a built text engine, as a person
types it, with each answer's time; with a reference (`--compare hf`) the
Hugging Face model's answer to the same conversation and its time beside it.

The conversation is the tokenizer's own chat template where it has one,
else "User: ... / Assistant: ..." lines. The oldest turns are dropped when
the conversation outgrows the engine's max_input_len. Lines that start with
"/" are commands: /reset forgets the conversation, /quit (or end of input)
ends it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import BadInput
from .runtime.decoding import GREEDY, Decoding, TextWatch

HELP = "type a message; /reset forgets the conversation, /quit ends it"


@dataclass
class Conversation:
    tokenizer: object
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant)

    def text(self, user: str, turns: Optional[list[tuple[str, str]]] = None) -> str:
        turns = self.turns if turns is None else turns
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            msgs = []
            for u, a in turns:
                msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            msgs.append({"role": "user", "content": user})
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return "".join(f"User: {u}\nAssistant: {a}\n" for u, a in turns) + f"User: {user}\nAssistant:"

    def ids(self, user: str, max_input_len: int) -> list[int]:
        """The conversation's token ids, oldest turns dropped until it fits."""
        for first in range(len(self.turns) + 1):
            ids = self.tokenizer(self.text(user, self.turns[first:])).input_ids
            if len(ids) <= max_input_len:
                return ids
        raise BadInput(f"this message alone is {len(ids)} tokens; the engine takes at most max_input_len "
                       f"{max_input_len}")


Answer = Callable[[list[int]], list[int]]  # prompt ids -> new ids


def chat(conv: Conversation, engine: Answer, max_input_len: int, read: Callable[[str], Optional[str]],
         write: Callable[[str], None], reference: Optional[Answer] = None, stop: tuple[str, ...] = ()) -> int:
    """The loop: read a line, answer it, print the answer with its time (and
    the reference's). Returns the number of answered turns."""
    tok = conv.tokenizer
    write(HELP + "\n")
    n = 0
    while True:
        line = read("you> ")
        if line is None or line.strip() == "/quit":
            return n
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            conv.turns.clear()
            write("(conversation forgotten)\n")
            continue
        if line.startswith("/"):
            write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        try:
            ids = conv.ids(line, max_input_len)
        except BadInput as e:
            write(f"enginefarm: {e}\n")
            continue
        answers = [("engine", engine)] + ([("hf", reference)] if reference else [])
        mine = ""
        for who, fn in answers:
            t0 = time.perf_counter()
            out = fn(ids)
            dt = time.perf_counter() - t0
            watch = TextWatch(1, lambda x: tok.decode(x, skip_special_tokens=True), stop)
            for t in out:
                if watch(0, t):
                    break
            text = watch.text(0, out).strip()
            write(f"{who}> {text}   ({dt:.2f} s, {len(out)} tokens)\n")
            mine = mine or text
        conv.turns.append((line, mine))
        n += 1


def engine_answer(eng, max_new_tokens: int, eos: Optional[int], decoding: Decoding = GREEDY) -> Answer:
    return lambda ids: eng.generate([ids], max_new_tokens, eos_token_id=eos, decoding=decoding)[0]


def reference_answer(src_dir, max_new_tokens: int, eos: Optional[int], pad: Optional[int]) -> Answer:
    """The Hugging Face model of the engine's checkpoint (fp32), greedy."""
    import torch

    from .evaluation import load_reference

    model = load_reference(src_dir)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))

    def answer(ids: list[int]) -> list[int]:
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, eos_token_id=eos,
                                 pad_token_id=pad if pad is not None else eos)[0].tolist()
        return out[1:] if seq2seq else out[len(ids):]

    return answer
