"""`enginefarm chat`: a conversation with a built engine, as a person types
it, with each answer's time; with a reference (`--compare hf`) the Hugging
Face model's answer to the same conversation and its time beside it.

Text engines: the conversation is the tokenizer's own chat template where it
has one, else "User: ... / Assistant: ..." lines.

Multimodal engines: a conversation is about one image (LLaVA-NeXT-Video: one
video or one image), as the engines take one per prompt. `/image PATH`
(`/video PATH`) starts a conversation about it; the first turn of the conversation carries
the image's placeholder, the later turns are text, written as the family
says (MultimodalFamily.chat_text: the processor's chat template where it has
one, else the format the model was trained with). Families that take no
conversation (BLIP's captions, Nougat's pages) answer each message alone.

In both, the oldest turns are dropped when the conversation outgrows the
engine's max_input_len. Lines that start with "/" are commands: /reset
forgets the conversation, /quit (or end of input) ends it. A bad command or
an unreadable file is one line; the conversation goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import BadInput
from .runtime.decoding import GREEDY, Decoding, TextWatch

HELP = "type a message; /reset forgets the conversation, /quit ends it"


def shown(text: str) -> str:
    """An answer on one terminal line: characters that are not printable
    (a newline, a control character) written as escapes, e.g. \\n."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def help_line(media, takes: tuple[str, ...] = ()) -> str:
    """media: what the engine takes ("image", "video"; None: text); takes: every kind, where it takes more"""
    if media is None:
        return HELP
    kinds = tuple(takes) or (media,)
    a = {"image": "an image", "video": "a video"}
    return (f"{' or '.join(f'/{k} PATH' for k in kinds)} starts a conversation about "
            f"{' or '.join(a[k] for k in kinds)}; {HELP}")


@dataclass
class Conversation:
    """A text engine's conversation; request() gives the prompt's token ids."""
    tokenizer: object
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant)
    media = None  # takes no images

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

    request = ids

    def attach(self, kind: str, path: str) -> str:
        raise BadInput(f"this is a text engine: it takes no {kind}s")


@dataclass
class MediaConversation:
    """A multimodal engine's conversation about one image (or video).
    request() gives (the loaded image, the conversation's text); `length`
    says how many tokens the engines make of them."""
    family: object
    processor: object
    media: str  # "image" or "video"
    load: Callable[[str, str], object]  # (kind, a path) -> the image (video); BadInput when it cannot be read
    length: Callable[[object, str], int]  # (image, text) -> the engine prompt's tokens
    token: str = "<image>"  # the placeholder the processor expands
    item: object = None
    name: Optional[str] = None
    turns: list[tuple[str, str]] = field(default_factory=list)
    takes: tuple[str, ...] = ()  # every kind the engine takes (LLaVA-NeXT-Video: video, image); () : media alone
    kind: Optional[str] = None  # the item's

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.takes) or (self.media,)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def attach(self, kind: str, path: str) -> str:
        if kind not in self.kinds:
            raise BadInput(f"this engine takes {self.media}s, not {kind}s: /{self.media} PATH")
        item = self.load(kind, path)  # a bad file: the conversation so far stays
        self.item, self.name, self.kind = item, path, kind
        self.turns.clear()
        return f"(a new conversation about {kind} {path})"

    def text(self, user: str, turns: Optional[list[tuple[str, str]]] = None) -> str:
        turns = self.turns if turns is None else turns
        if not getattr(self.family, "conversational", True):
            turns = []
        kind = self.kind or self.media
        token = getattr(self.processor, "placeholder_token", None)  # a processor of several kinds: each one's
        return self.family.chat_text(self.processor, turns, user, token(kind) if token else self.token, kind)

    def request(self, user: str, max_input_len: int) -> tuple[object, str]:
        if self.item is None:
            kinds = " or ".join(f"/{k} PATH" for k in self.kinds)
            raise BadInput(f"no {' or '.join(self.kinds)} yet: give one with {kinds}")
        for first in range(len(self.turns) + 1):
            text = self.text(user, self.turns[first:])
            n = self.length(self.item, text)
            if n <= max_input_len:
                return self.item, text
        raise BadInput(f"this message and the {self.media} alone are {n} tokens; the engine takes at most "
                       f"max_input_len {max_input_len}")


Answer = Callable[[object], list[int]]  # a request (prompt ids; or an image and a text) -> new ids


def chat(conv, engine: Answer, max_input_len: int, read: Callable[[str], Optional[str]],
         write: Callable[[str], None], reference: Optional[Answer] = None, stop: tuple[str, ...] = ()) -> int:
    """The loop: read a line, answer it, print the answer with its time (and
    the reference's). Returns the number of answered turns."""
    tok = conv.tokenizer
    hint = help_line(conv.media, getattr(conv, "takes", ()))
    write(hint + "\n")
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
        word, _, rest = line.partition(" ")
        if word in ("/image", "/video"):
            try:
                if not rest.strip():
                    raise BadInput(f"{word} PATH: give the file")
                write(conv.attach(word[1:], rest.strip()) + "\n")
            except BadInput as e:
                write(f"enginefarm: {e}\n")
            continue
        if line.startswith("/"):
            write(f"unknown command {word}; {hint}\n")
            continue
        try:
            req = conv.request(line, max_input_len)
            answers = [("engine", engine)] + ([("hf", reference)] if reference else [])
            mine = ""
            for who, fn in answers:
                t0 = time.perf_counter()
                out = fn(req)
                dt = time.perf_counter() - t0
                watch = TextWatch(1, lambda x: tok.decode(x, skip_special_tokens=True), stop)
                for t in out:
                    if watch(0, t):
                        break
                text = watch.text(0, out).strip()
                write(f"{who}> {shown(text)}   ({dt:.2f} s, {len(out)} tokens)\n")
                mine = mine if who != "engine" else text
        except BadInput as e:
            write(f"enginefarm: {e}\n")
            continue
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


# ----------------------------------------------------------------------------- multimodal


def media_conversation(pipe, load: Callable[[str, str], object]) -> MediaConversation:
    """A conversation with a runtime.multimodal.MultimodalPipeline."""

    def length(item, text: str) -> int:
        if pipe.encoder_output:  # the features are the decoder's encoder output: the prompt's tokens count
            return len(pipe.prepare([item], [text])[0]["prompt_ids"])
        return len(pipe.inputs([item], [text])[0][0])

    return MediaConversation(pipe.family, pipe.processor, pipe.media, load, length, token=pipe.image_token,
                             takes=pipe.takes)


def media_engine_answer(pipe, max_new_tokens: int, decoding: Decoding = GREEDY) -> Answer:
    return lambda req: pipe.generate([req[0]], [req[1]], max_new_tokens, eos_token_id=pipe.eos_token_id,
                                     decoding=decoding)[0]


def media_reference_answer(pipe, src_dir, max_new_tokens: int) -> Answer:
    """The Hugging Face model of a multimodal checkpoint (fp32), greedy, on
    the processor's inputs for the same image and text (as validation runs it)."""
    import torch

    fam = pipe.family
    model = fam.reference_model(src_dir)
    eos, pad = pipe.eos_token_id, pipe.processor.tokenizer.pad_token_id

    def answer(req) -> list[int]:
        item, text = req
        enc = fam.encode(pipe.processor, item, text, pipe.image_token)
        with torch.no_grad():
            if pipe.seq2seq or pipe.encoder_output:
                return fam.reference_generate(model, enc, pipe.llm.decoder_start_token_id, max_new_tokens, eos, pad)
            out = model.generate(**{k: v for k, v in enc.items() if k != "prompt_ids"}, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad)
        return out[0, enc["input_ids"].shape[1]:].tolist()

    return answer
