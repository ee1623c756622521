"""The toy model's batches and losses: right-padded batches of prepared prompts with every
supervised token (``collate``), the answer, option and guided-attention losses
(``training_losses``), the scene-label loss on the vision tower's output (``aux_loss``) and the
teacher-forced accuracy logged during training (``letter_accuracy``)."""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch
import torch.nn.functional as F

from prunevid_bench.models.tiny import IM_END_ID, PAD_ID
from prunevid_bench.toy.train_data import AUX_HEADS, TEXT_FORMS, PixelCodec, Sample
from prunevid_bench.toy.world import LETTERS


def collate(batch: list[tuple[Sample, str]], codec: PixelCodec, noise_std: float = 0.0, generator=None):
    """Right-padded model inputs for (sample, form) pairs and the (row, index, target) of every
    supervised token. Right padding needs no attention mask: under the causal mask no real token
    sees a pad."""
    prompts = [s.prompts[form] for s, form in batch]
    length = max(p.input_ids.shape[0] for p in prompts)
    input_ids = torch.full((len(batch), length), PAD_ID, dtype=torch.long)
    mm_types = torch.zeros((len(batch), length), dtype=torch.long)
    # Pads continue every position row by one per token (the text row stays arange(length)).
    positions = torch.arange(length).view(1, 1, length).repeat(4, len(batch), 1)
    for row, p in enumerate(prompts):
        n = p.input_ids.shape[0]
        input_ids[row, :n] = p.input_ids
        mm_types[row, :n] = p.mm_token_type_ids
        positions[:, row, :n] = p.position_ids
        positions[1:, row, n:] += p.position_ids[1:, -1:] - (n - 1)
    inputs = dict(input_ids=input_ids, position_ids=positions, mm_token_type_ids=mm_types)
    samples = [s for s, form in batch if form not in TEXT_FORMS]
    if samples:
        assert len(samples) == len(batch), "a batch is all video prompts or all text prompts"
        inputs.update(
            pixel_values_videos=torch.cat([codec.decode(s.pixels, noise_std, generator) for s in samples]),
            video_grid_thw=torch.cat([s.video_grid_thw for s in samples]),
        )
        if samples[0].second_per_grid_ts is not None:  # Qwen2.5-VL's time ids; Qwen3-VL writes timestamps
            inputs["second_per_grid_ts"] = torch.cat([s.second_per_grid_ts for s in samples])
    rows, index, targets = [], [], []
    for row, p in enumerate(prompts):
        # Each position from the prompt's last on predicts the next answer token; the last answer
        # token predicts <|im_end|>.
        answer = p.input_ids[p.prompt_length:].tolist()
        rows += [row] * (len(answer) + 1)
        index += list(range(p.final, p.final + len(answer) + 1))
        targets += answer + [IM_END_ID]
    with_opts = [(row, p) for row, p in enumerate(prompts) if p.options is not None]
    options = Options(
        torch.tensor([row for row, _ in with_opts], dtype=torch.long),
        torch.stack([p.options for _, p in with_opts]) if with_opts else torch.zeros(0, len(LETTERS), dtype=torch.long),
        torch.tensor([p.correct for _, p in with_opts], dtype=torch.long),
        torch.tensor([p.letter_at for _, p in with_opts], dtype=torch.long),
    )
    if samples:  # video prompts: where the visual tokens are, and which show the object asked about
        visual = torch.stack([torch.nonzero(p.mm_token_type_ids == 2).flatten() for p in prompts])
        target = torch.stack([s.labels[:, -1] == s.target + 1 for s in samples])
        looks = torch.stack([s.labels[mask][0, :len(OBJECT_LOOKS)] if mask.any() else torch.full((len(OBJECT_LOOKS),), -100)
                             for s, mask in zip(samples, target)])
    else:
        visual = target = torch.zeros(len(batch), 0, dtype=torch.long)
        looks = torch.full((len(batch), len(OBJECT_LOOKS)), -100)
    return inputs, Supervision(torch.tensor(rows), torch.tensor(index), torch.tensor(targets), options,
                               torch.tensor([p.final for p in prompts]),
                               torch.tensor([p.anchor for p in prompts]), torch.tensor([p.naming for p in prompts]),
                               torch.tensor([p.naming_level for p in prompts]), visual, target.bool(),
                               torch.tensor([s.answer_word for s, _ in batch]), looks,
                               torch.stack([s.labels[:, -1] > 0 for s in samples]) if samples else target.bool())


# What the anchor is asked to have read of its object (looks_head in training_losses): the first
# label kinds of AUX_HEADS.
OBJECT_LOOKS = ("colour", "shape", "motion")
assert tuple(AUX_HEADS)[:len(OBJECT_LOOKS)] == OBJECT_LOOKS


class Options(NamedTuple):
    rows: torch.Tensor  # [N] batch rows of the multiple-choice prompts
    positions: torch.Tensor  # [N, 4] their option words
    correct: torch.Tensor  # [N] index of the answer among them
    letter_at: torch.Tensor  # [N] the position that predicts the answer letter


class Supervision(NamedTuple):
    rows: torch.Tensor  # [M] batch row of each supervised token
    index: torch.Tensor  # [M] the position whose logits predict it
    targets: torch.Tensor  # [M]
    options: Options
    final: torch.Tensor  # [B] the prompt's last position, which predicts the answer word
    anchor: torch.Tensor  # [B] the question word naming the object asked about (-1 in text-only batches)
    naming: torch.Tensor  # [B, 2] the words naming the object asked about (-1 where none do)
    naming_level: torch.Tensor  # [B] from which TrainConfig.naming_guide they are guided (0: never)
    visual: torch.Tensor  # [B, V] positions of the visual tokens (V = 0 in a text-only batch)
    target: torch.Tensor  # [B, V] the visual tokens of the object the question asks about
    answer_word: torch.Tensor  # [B] the answer, index into ANSWER_WORDS
    looks: torch.Tensor  # [B, 3] the colour, shape and motion labels of that object (-100 where no token shows it)
    objects: torch.Tensor  # [B, V] the visual tokens that show any object (the glance guide's target)


class VisualTap:
    """Keeps the vision tower's merged output (the LLM's visual embeddings) of the last forward."""

    def __init__(self, model):
        self.features = None
        self._hook = model.model.visual.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.features = output.pooler_output

    def remove(self):
        self._hook.remove()


def late_reading_loss(attentions, input_ids: torch.Tensor, visual: torch.Tensor, layers: int,
                      pointers: tuple[tuple[int, int], ...] = ()) -> torch.Tensor | None:
    """How much the text after the video (question, options, answer) reads the visual tokens in
    the first ``layers`` layers: -log(1 - its attention mass on them), averaged over those layers'
    heads and the text positions, leaving out the ``pointers`` heads (layer, head), whose attention
    may point at them (their output is held at zero: ``hold_pointer``). Pushed to zero, the text
    reads the visual tokens only from layer ``layers`` on, so which of them survive a pruning
    before it decides the answer. None when no layer is asked or the batch has no video."""
    if layers <= 0 or visual.shape[1] == 0:
        return None
    after = torch.arange(input_ids.shape[1]).view(1, -1) > visual.max(1).values.view(-1, 1)
    text = (after & (input_ids != PAD_ID)).unsqueeze(1)  # [B, 1, L]
    losses = []
    for layer, a in enumerate(attentions[:layers]):  # [B, H, L, L]
        b, h, n, _ = a.shape
        mass = a.float().gather(-1, visual[:, None, None, :].expand(b, h, n, visual.shape[1])).sum(-1)  # [B, H, L]
        heads = [i for i in range(h) if (layer, i) not in pointers]
        losses.append(-(1 - mass[:, heads] + 1e-6).log()[text.expand(b, len(heads), n)].mean())
    return sum(losses) / len(losses)


def hold_pointer(model, pointer: tuple[int, int]) -> None:
    """Zero the pointer head's columns of its layer's o_proj, and keep them zero in training (their
    gradient is zeroed): the head's attention can be read as a score, its values add nothing."""
    layer, head = pointer
    attn = model.model.language_model.layers[layer].self_attn
    width = attn.head_dim
    cols = slice(head * width, (head + 1) * width)
    with torch.no_grad():
        attn.o_proj.weight[:, cols] = 0

    def keep_zero(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:, cols] = 0
        return grad

    attn.o_proj.weight.register_hook(keep_zero)


def training_losses(model, option_head, word_head, inputs, sup: Supervision, naming_guide: int, guides=None,
                    late_reading: int = 0, looks_head=None, looks_weight: float = 1.0, glance_weight: float = 0.0,
                    letter_head=None, letter_weight: float = 1.0):
    """(answer loss, option loss, guide loss).

    The answer loss is on the supervised tokens (the LM head never sees the rest). The option
    loss asks each option word's final hidden state whether it is the answer (a softmax over
    the four). The attention loss guides five heads (``ATTENTION_GUIDES``): each option word
    looks back at its letter; the question word that names the object reads the words naming it
    ("top" "left" before "corner"; with ``naming_guide`` 2 also "green" in "the green circle");
    the same word (see anchor_position) looks at that object's visual tokens; the answer position looks at that question word, then
    at the option word that is the answer. The guide loss also asks the answer position for the
    answer word before the last layer (``word_head``). What to take from the object, and how to
    match it to an option, is left to learn. ``guides`` (default ``ATTENTION_GUIDES``) places the
    heads; a "select" guide (``DEEP_GUIDES``) also points that word at its object in an earlier layer.
    ``late_reading`` adds ``late_reading_loss`` over that many first layers (the select head is the pointer).
    ``looks_head`` (a linear layer to the ``OBJECT_LOOKS`` classes), when given, asks the anchor
    right after the "object" layer for its object's colour, shape and motion (what that head read),
    a term ``looks_weight`` times the size of one guide's. ``glance_weight`` above 0 guides the
    "glance" head: the prompt's last position looks at every visual token that shows an object,
    a question-blind salience that FastV's score reads there (its output is held at zero, and late
    reading leaves it out, as the select head). ``letter_head`` (a linear layer to the letters),
    when given, asks each option word for its own letter at the input of the "answer" layer, the
    hidden state that head copies the letter from; ``letter_weight`` times one guide's size.
    """
    guides = guides or ATTENTION_GUIDES
    out = model.model(**inputs, use_cache=False, output_attentions=True, output_hidden_states=True)
    hidden, attentions = out.last_hidden_state, out.attentions
    answer = F.cross_entropy(model.lm_head(hidden[sup.rows, sup.index]).float(), sup.targets)

    def attention(guide: str, rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return head_attention(attentions, guides[guide], rows, queries)

    eps = 1e-6
    losses = []
    o = sup.options
    option = hidden.new_zeros(())
    if len(o.rows):
        scores = option_head(hidden[o.rows[:, None], o.positions]).squeeze(-1).float()  # [N, 4]
        option = F.cross_entropy(scores, o.correct)
        to_letter = attention("letter", o.rows, o.positions).gather(-1, (o.positions - 2)[..., None]).squeeze(-1)
        to_option = attention("answer", o.rows, o.letter_at).gather(-1, o.positions.gather(1, o.correct[:, None])).squeeze(-1)
        losses += [-(to_letter + eps).log().mean(), -(to_option + eps).log().mean()]
        if letter_head is not None:
            losses.append(letter_weight * option_letter_loss(out.hidden_states, o, letter_head, guides["answer"][0]))
    shown = sup.target.any(-1)
    if shown.any():
        rows = torch.arange(len(sup.final))
        for guide in ("object", "select") if "select" in guides else ("object",):
            look = attention(guide, rows, sup.anchor).gather(-1, sup.visual)  # [B, V]
            losses.append(-((look * sup.target).sum(-1)[shown] + eps).log().mean())
        to_anchor = attention("question", rows, sup.final).gather(-1, sup.anchor[:, None]).squeeze(-1)
        losses.append(-(to_anchor + eps).log().mean())
        # What the answer position holds before the last layer matches it to an option: the answer word.
        middle = out.hidden_states[guides["answer"][0]][rows, sup.final]
        losses.append(F.cross_entropy(word_head(middle).float(), sup.answer_word))
        if looks_head is not None:
            losses.append(looks_weight * looks_loss(out.hidden_states, sup, looks_head, guides["object"][0] + 1))
    if glance_weight and sup.objects.any():
        losses.append(glance_weight * glance_loss(attentions, sup, guides["glance"]))
    late = late_reading_loss(attentions, inputs["input_ids"], sup.visual, late_reading, pointer_heads(guides, glance_weight))
    if late is not None:
        losses.append(late)
    named = (sup.naming_level > 0) & (sup.naming_level <= naming_guide)
    if named.any():  # the anchor reads the words that name its object
        rows = torch.nonzero(named).flatten()
        to_name = attention("naming", rows, sup.anchor[rows]).gather(-1, sup.naming[rows])  # [N, 2]
        losses.append(-(to_name + eps).log().mean())
    return answer, option, sum(losses) / max(1, len(losses))


def head_attention(attentions, head: tuple[int, int], rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """The attention rows of ``head`` (layer, head) at ``queries`` of each prompt in ``rows``
    (queries [N] or [N, k]): [N, ..., L], in float32."""
    layer, h = head
    rows = rows.view(-1, *([1] * (queries.dim() - 1)))
    return attentions[layer][rows, h, queries].float()


def looks_loss(hidden_states, sup: Supervision, looks_head, layer: int) -> torch.Tensor:
    """What the anchor holds at the input of ``layer`` (the one after the "object" head's), asked
    for its object's colour, shape and motion (``OBJECT_LOOKS``; -100 where no token shows it):
    the mean of the three cross-entropies."""
    read = hidden_states[layer][torch.arange(len(sup.final)), sup.anchor]
    logits = looks_head(read).float().split([AUX_HEADS[k] for k in OBJECT_LOOKS], dim=-1)
    return sum(F.cross_entropy(lg, sup.looks[:, k], ignore_index=-100)
               for k, lg in enumerate(logits)) / len(OBJECT_LOOKS)


def glance_loss(attentions, sup: Supervision, head: tuple[int, int], eps: float = 1e-6) -> torch.Tensor:
    """-log of the attention the prompt's last position gives, in ``head`` (layer, head), to the
    visual tokens that show an object, averaged over the prompts where one does."""
    seen = sup.objects.any(-1)
    look = head_attention(attentions, head, torch.arange(len(sup.final)), sup.final).gather(-1, sup.visual)  # [B, V]
    return -((look * sup.objects).sum(-1)[seen] + eps).log().mean()


def option_letter_loss(hidden_states, options, letter_head, layer: int) -> torch.Tensor:
    """Cross-entropy of each option word's own letter (A for the first option, ...) read by
    ``letter_head`` from its hidden state at the input of ``layer`` (``hidden_states[layer]``,
    what that layer's "answer" head copies): the letter must still be there after the layers
    that read the video."""
    held = hidden_states[layer][options.rows[:, None], options.positions]  # [N, options, hidden]
    own = torch.arange(options.positions.shape[1]).expand_as(options.positions)
    return F.cross_entropy(letter_head(held).flatten(0, 1).float(), own.flatten())


# Guided heads as (layer, head).
ATTENTION_GUIDES = {"letter": (0, 1), "naming": (0, 2), "object": (1, 0), "question": (2, 0), "answer": (3, 0)}
# The 8-layer toy8: the named object is selected in layer 3 (where the presets' "10/28" prunes) and
# read in layer 4, after the pruning, so which visual tokens survive layer 3 decides the answer.
# "glance" (used with a glance weight only) is a layer-0 head FastV's "2/28" (K = 1 on 8 layers) reads.
DEEP_GUIDES = {"letter": (0, 1), "naming": (0, 2), "select": (3, 1), "object": (4, 0), "question": (5, 0),
               "answer": (6, 0), "glance": (0, 3)}


def pointer_heads(guides: dict[str, tuple[int, int]], glance_weight: float = 0.0) -> tuple[tuple[int, int], ...]:
    """The heads whose attention points at visual tokens and whose output is held at zero: the
    select head, and the glance head when it is guided."""
    names = ("select", "glance") if glance_weight else ("select",)
    return tuple(guides[n] for n in names if n in guides)


def guides_for(layers: int) -> dict[str, tuple[int, int]]:
    """The guided heads of a toy model of this depth (4: the shipped ``toy``; 8: ``toy8``)."""
    if layers not in (4, 8):
        raise ValueError(f"the toy recipe has guides for 4 or 8 layers, not {layers}")
    return ATTENTION_GUIDES if layers == 4 else DEEP_GUIDES


@torch.no_grad()
def letter_accuracy(model, samples: list[Sample], codec: PixelCodec, batch_size: int) -> dict[str, float]:
    """Teacher-forced accuracy of the "mc" form: the answer word (the first generated token) and
    the letter after the right word, overall and per category (the log's view; the real test
    is `prunevid run --dataset`)."""
    model.eval()
    hits: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for i in range(0, len(samples), batch_size):
        batch = [(s, "mc") for s in samples[i:i + batch_size]]
        inputs, sup = collate(batch, codec)
        hidden = model.model(**inputs, use_cache=False).last_hidden_state
        rows = torch.arange(len(batch))
        ids = inputs["input_ids"]
        word = model.lm_head(hidden[rows, sup.final]).argmax(-1) == ids[rows, sup.final + 1]
        at = sup.options.letter_at
        letter = model.lm_head(hidden[rows, at]).argmax(-1) == ids[rows, at + 1]
        for (s, _), w, l in zip(batch, word.tolist(), letter.tolist()):
            hits[s.category].append((w, l))
            hits["all"].append((w, l))
    model.train()
    return {k: (sum(w for w, _ in v) / len(v), sum(w and l for w, l in v) / len(v)) for k, v in sorted(hits.items())}


def aux_loss(heads: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the per-token scene labels, one linear head per label kind."""
    logits = heads(features.float()).split(list(AUX_HEADS.values()), dim=-1)
    return sum(F.cross_entropy(lg, labels[:, k]) for k, lg in enumerate(logits)) / len(AUX_HEADS)
