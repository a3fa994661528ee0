"""Language-free conditioning (Lafite2): pseudo text for images that come without any caption.

Lafite2 trains a text-to-image model on image-only data by giving each image pseudo text features: retrieved
from a text bank near the image's CLIP feature, then optimised contrastively in CLIP space. SD reads a sequence
of token states, not one feature, so here the pseudo text is a prompt: the recipe's prompt with `{class}` replaced
by a new token, whose embedding starts from the retrieved words and is then optimised so that the prompt's CLIP
text feature points at its image (and away from the others), with Lafite's perturbation noise. The UNet then
trains on those prompts. Nothing here exists in diffusers or transformers (textual inversion optimises a token
for the diffusion loss, not for CLIP alignment), hence this module; the tokens are saved as textual-inversion
files that diffusers' `load_textual_inversion` reads.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..downloads import cached_hub_file, from_hub, is_hub_id
from ..errors import RareaugError, one_line

TEMPERATURE = 0.07  # CLIP's contrastive temperature
RETRIEVE_K = 5  # words mixed into a token's starting embedding
RETRIEVAL_SHARPNESS = 0.01  # softmax temperature over the retrieved words' similarities
REGULARISATION = 0.1  # pull toward the retrieved embedding, so the token stays among real words
TOKEN_LR = 5e-3  # textual inversion's learning rate
TOKEN_BATCH = 256
WORD_BATCH = 1024


@dataclasses.dataclass
class PseudoText:
    names: list[str]  # the new tokens, "<rareaug-0>", ...
    embeddings: torch.Tensor  # (tokens, hidden) rows added to the text encoder's table
    assignment: list[int]  # image index -> token index
    nearest_words: list[str]  # the word each token was retrieved nearest to
    loss: float  # the contrastive loss at the end


class PseudoTokenEmbedding(nn.Module):
    """A text tower's token table with `extra` rows appended (ids vocab .. vocab+n-1): the vocabulary stays frozen.

    With `noise` > 0 every call perturbs the extra rows as Lafite perturbs its pseudo text features:
    e + noise * |e| * n / |n|, n ~ N(0, I), drawn from `generator`.
    """

    def __init__(self, table: nn.Embedding, extra: torch.Tensor, trainable: bool):
        super().__init__()
        self.table = table
        self.extra = nn.Parameter(extra.clone().to(table.weight.device, torch.float32), requires_grad=trainable)
        self.noise = 0.0
        self.generator: torch.Generator | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        extra = perturbed(self.extra, self.noise, self.generator) if self.noise else self.extra
        return F.embedding(ids, torch.cat([self.table.weight, extra.to(self.table.weight.dtype)]))


def perturbed(values: torch.Tensor, scale: float, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.randn(values.shape, generator=generator).to(values)
    return values + scale * values.norm(dim=-1, keepdim=True) * noise / noise.norm(dim=-1, keepdim=True)


@contextlib.contextmanager
def pseudo_tokens(encoder, extra: torch.Tensor, trainable: bool = False):
    """Install `extra` rows into a CLIP text tower (CLIPTextModel or CLIPModel.text_model) for the block."""
    original = encoder.get_input_embeddings()
    module = PseudoTokenEmbedding(original, extra, trainable)
    encoder.set_input_embeddings(module)
    try:
        yield module
    finally:
        encoder.set_input_embeddings(original)


def token_names(count: int) -> list[str]:
    return [f"<rareaug-{j}>" for j in range(count)]


def tokenizer_with(tokenizer, names: list[str]):
    """A copy of the tokenizer that knows `names` as ids len(tokenizer) .. len(tokenizer) + n - 1."""
    extended = copy.deepcopy(tokenizer)
    first = len(extended)
    extended.add_tokens(names)
    if extended.convert_tokens_to_ids(names) != list(range(first, first + len(names))):
        raise RareaugError("the tokenizer did not add the pseudo-tokens as new ids; a tokenizer with added tokens "
                           "is not supported for language-free adaptation")
    return extended


def prompt_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="longest", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def text_features(clip, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Normalised CLIP text features, pooled at the first end-of-text token (new ids are larger than the end-of-text
    id, so the legacy argmax pooling of some CLIP configs would pick the pseudo-token instead)."""
    states = clip.text_model(input_ids=ids).last_hidden_state
    pooled = states[torch.arange(len(ids)), (ids == eos_id).int().argmax(-1)]
    return F.normalize(clip.text_projection(pooled).float(), dim=-1)


def image_features(clip, images: torch.Tensor, clip_folder: str | None) -> torch.Tensor:
    """Normalised CLIP image features of images in [-1, 1]. A CLIP (folder or hub id) with a preprocessor config
    is fed as its CLIPImageProcessor says; mini's and the tiny CLIP read [-1, 1] pixels at their own size."""
    size = clip.config.vision_config.image_size
    processor_file = _processor_file(clip_folder)
    normalise = None
    if processor_file is not None:
        config = json.loads(processor_file.read_text())
        normalise = (torch.tensor(config["image_mean"]).view(1, 3, 1, 1),
                     torch.tensor(config["image_std"]).view(1, 3, 1, 1))
    features = []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            chunk = images[start:start + 256].float()
            if normalise is not None:
                mean, std = normalise
                chunk = (F.interpolate(chunk / 2 + 0.5, size=(size, size), mode="bicubic", antialias=True,
                                       align_corners=False).clamp(0, 1) - mean) / std
            elif chunk.shape[-1] != size:
                chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            device = clip.visual_projection.weight.device
            pooled = clip.vision_model(pixel_values=chunk.to(device, clip.dtype)).pooler_output
            features.append(F.normalize(clip.visual_projection(pooled).float(), dim=-1).cpu())
    return torch.cat(features)


def _processor_file(clip_spec: str | None) -> Path | None:
    """The CLIP's preprocessor_config.json: in its folder, or in the hub cache for a hub id."""
    if not clip_spec:
        return None
    local = Path(clip_spec).expanduser() / "preprocessor_config.json"
    if local.is_file():
        return local
    cached = cached_hub_file(clip_spec, "preprocessor_config.json") if is_hub_id(clip_spec) else None
    return Path(cached) if cached else None


def candidate_words(tokenizer, texts: list[str], vocabulary: bool = True) -> list[str]:
    """The retrieval bank: the words of `texts` (recipe prompts, --captions) and the tokenizer's whole words."""
    words = {word for text in texts for word in re.findall(r"[a-z][a-z-]+[a-z]", text.lower())}
    if vocabulary:
        words |= {token[:-4] for token in tokenizer.get_vocab()
                  if re.fullmatch(r"[a-z]{3,}</w>", token)}
    return sorted(words)


def check_same_text_tower(clip, text_encoder, where: str) -> None:
    """Pseudo-tokens optimised in one CLIP only mean the same to the UNet if its text encoder is that tower."""
    ours = clip.text_model.get_input_embeddings().weight
    theirs = text_encoder.get_input_embeddings().weight
    rows = min(len(ours), len(theirs), 2048)
    if ours.shape[1] != theirs.shape[1] or not torch.allclose(ours[:rows].float().cpu(), theirs[:rows].float().cpu(),
                                                              atol=1e-3):
        raise RareaugError(f"--clip-model {where}: its text tower is not the base model's text encoder; give the CLIP "
                           "the base was conditioned on (SD 1.x: OpenAI ViT-L/14, SD 2.x: OpenCLIP ViT-H/14)")


def load_clip(spec: str | None, base_spec: str, text_encoder):
    """The CLIP for language-free conditioning: --clip-model, or mini's own CLIP for `--base-model mini`, or a tiny
    CLIP whose text tower is the tiny base's text encoder for `--base-model tiny` (tests)."""
    from transformers import CLIPConfig, CLIPModel

    if spec is None and base_spec == "mini":
        from ..models.mini import load_mini_clip

        clip = load_mini_clip()
    elif spec is None and base_spec == "tiny":
        text_config = text_encoder.config.to_dict()
        config = CLIPConfig(text_config=text_config, projection_dim=text_config["hidden_size"],
                            vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                               num_hidden_layers=2, num_attention_heads=4))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            clip = CLIPModel(config)
        _copy_text_tower(clip, text_encoder)
    elif spec is None:
        raise RareaugError("--conditioning language-free needs --clip-model PATH: the CLIP whose text tower the base "
                           "model reads (SD 1.x: OpenAI ViT-L/14, SD 2.x: OpenCLIP ViT-H/14), as a local folder or a "
                           "hub id")
    elif Path(spec).expanduser().is_dir():
        try:
            clip = CLIPModel.from_pretrained(str(Path(spec).expanduser()), local_files_only=True)
        except Exception as error:  # transformers raises many types; the user needs one line
            raise RareaugError(f"--clip-model {spec}: did not load as a CLIP folder ({one_line(error)}); give a "
                               "local folder with config.json and the weights") from error
    elif is_hub_id(spec):
        clip = from_hub(lambda local: _clip_from_hub(spec, local), spec, f"--clip-model {spec}",
                        "give a local CLIP folder with config.json and the weights", probe="config.json")
    else:
        raise RareaugError(f"--clip-model {spec}: no such folder; give a local CLIP folder with config.json and the "
                           "weights, or a hub id (owner/name)")
    clip = clip.float().eval().requires_grad_(False)
    check_same_text_tower(clip, text_encoder, spec or base_spec)
    return clip


def _clip_from_hub(repo: str, local_files_only: bool):
    """The CLIP and the preprocessor config `image_features` reads, both into (or from) the hub cache."""
    from huggingface_hub import hf_hub_download
    from transformers import CLIPModel

    hf_hub_download(repo, "preprocessor_config.json", local_files_only=local_files_only)
    return CLIPModel.from_pretrained(repo, local_files_only=local_files_only)


def _copy_text_tower(clip, text_encoder) -> None:
    weights = text_encoder.state_dict()
    target = clip.text_model.state_dict()
    prefix_in = "text_model." if all(key.startswith("text_model.") for key in weights) else ""
    prefix_out = "text_model." if all(key.startswith("text_model.") for key in target) else ""
    clip.text_model.load_state_dict({prefix_out + key[len(prefix_in):]: value for key, value in weights.items()})


def make_pseudo_text(clip, tokenizer, image_feats: torch.Tensor, template: str, bank_texts: list[str],
                     tokens: int, steps: int, perturbation: float, generator: torch.Generator,
                     seed: int) -> PseudoText:
    """Retrieval, then contrastive optimisation, of one pseudo-token per image (tokens = 0) or per k-means cluster."""
    device = clip.text_projection.weight.device
    eos_id = tokenizer.eos_token_id
    # 1. Which images share a token, and the CLIP feature each token must point at.
    n = len(image_feats)
    if 0 < tokens < n:
        from sklearn.cluster import KMeans

        labels = KMeans(n_clusters=tokens, n_init=3, random_state=seed).fit_predict(image_feats.numpy())
        assignment = [int(label) for label in labels]
        targets = F.normalize(torch.stack([image_feats[labels == j].mean(0) for j in range(tokens)]), dim=-1)
    else:
        assignment, targets = list(range(n)), image_feats
    targets = targets.to(device)
    # 2. Retrieval: each token starts from the embeddings of the words whose prompts CLIP finds nearest.
    words = candidate_words(tokenizer, bank_texts)
    table = clip.text_model.get_input_embeddings().weight.detach().float()
    word_feats, word_embeds = [], []
    with torch.no_grad():
        for start in range(0, len(words), WORD_BATCH):
            chunk = words[start:start + WORD_BATCH]
            word_feats.append(text_features(clip, prompt_ids(tokenizer, [template.replace("{class}", w)
                                                                         for w in chunk]).to(device), eos_id))
            for word in chunk:
                ids = tokenizer(word, add_special_tokens=False).input_ids
                word_embeds.append(table[ids].mean(0))
    word_feats, word_embeds = torch.cat(word_feats), torch.stack(word_embeds)
    similarity = targets @ word_feats.T
    top = similarity.topk(min(RETRIEVE_K, len(words)), dim=-1)
    weights = torch.softmax(top.values / RETRIEVAL_SHARPNESS, dim=-1)
    start_embeds = (weights[..., None] * word_embeds[top.indices]).sum(1)
    nearest = [words[int(i)] for i in top.indices[:, 0]]
    # 3. Contrastive optimisation in CLIP space, with Lafite's perturbation of the text features.
    names = token_names(len(targets))
    extended = tokenizer_with(tokenizer, names)
    ids = prompt_ids(extended, [template.replace("{class}", name) for name in names]).to(device)
    loss_value = float("nan")
    with pseudo_tokens(clip.text_model, start_embeds, trainable=True) as module:
        optimizer = torch.optim.Adam([module.extra], lr=TOKEN_LR)
        for _ in range(steps):
            batch = (torch.arange(len(names)) if len(names) <= TOKEN_BATCH
                     else torch.randperm(len(names), generator=generator)[:TOKEN_BATCH]).to(device)
            feats = text_features(clip, ids[batch], eos_id)
            feats = F.normalize(perturbed(feats, perturbation, generator), dim=-1) if perturbation else feats
            logits = feats @ targets[batch].T / TEMPERATURE
            labels = torch.arange(len(batch), device=device)
            contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            drift = ((module.extra[batch] - start_embeds[batch]).pow(2).sum(-1)
                     / start_embeds[batch].pow(2).sum(-1).clamp_min(1e-12)).mean()
            loss = contrastive + REGULARISATION * drift
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = float(contrastive.detach())
        embeddings = module.extra.detach().cpu()
    return PseudoText(names, embeddings, assignment, nearest, loss_value)


def alignment(clip, tokenizer, pseudo: PseudoText, template: str, image_feats: torch.Tensor) -> dict[str, float]:
    """How well the pseudo prompts match their images in CLIP space (a check, not a loss): the mean cosine of each
    image with its own prompt, and the share of images whose most similar prompt is their own (the contrastive
    objective improves the second; the first may fall while prompts become distinct)."""
    extended = tokenizer_with(tokenizer, pseudo.names)
    ids = prompt_ids(extended, [template.replace("{class}", name) for name in pseudo.names])
    with torch.no_grad(), pseudo_tokens(clip.text_model, pseudo.embeddings):
        feats = text_features(clip, ids.to(clip.text_projection.weight.device), extended.eos_token_id).cpu()
    similarity = image_feats @ feats.T  # (images, tokens)
    own = torch.tensor(pseudo.assignment)
    return {"cosine": float(similarity[torch.arange(len(own)), own].mean()),
            "top1": float((similarity.argmax(dim=1) == own).float().mean())}
