"""A text-conditioned diffusers teacher trained from a labelled dataset: `emdctl teacher train` of a
`kind: teacher-train-text` recipe.

Each image is captioned by one of its class's phrasings, drawn per sample from the seeded streams
(so the run is the same at any process count, micro-batching or resume), and replaced by the empty
prompt with probability `prompt_dropout`, which is what classifier-free guidance needs. The text
encoder is a small CLIP text transformer over a character vocabulary, randomly initialized from the
seed and frozen: every prompt is encoded once, and the UNet (diffusers' UNet2DConditionModel inside
emdctl's EDM-form wrapper) learns to read the embeddings. The loss is diffusers' epsilon loss at a
uniformly drawn integer timestep, ||eps_hat - eps||^2, which in EDM form is (1 / sigma^2) ||D - x0||^2.
The exported teacher is a diffusers pipeline directory (pixel space, no VAE) with the prompt file
beside it, which `teacher.kind: diffusers` reads like any other pipeline.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..data import open_dataset
from ..errors import UserError
from ..networks.diffusers_nets import DiffusersUNet, DiffusersVPPrecond, require_diffusers
from ..rng import derive_seed
from .edm_training import TeacherTraining

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Four phrasings per digit, written here (issue 38): a word form, a numeral form and two sentences.
MNIST_PROMPTS = {
    d: [f"a handwritten digit {w}", f"the number {d}", f"a hand-written {d}", f"{w}, written by hand"]
    for d, w in enumerate(NUMBER_WORDS)
}
VOCAB_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.-'"


def class_prompts(recipe) -> dict[int, list[str]]:
    return {int(k): list(v) for k, v in (recipe.prompts or MNIST_PROMPTS).items()}


def write_char_vocab(directory: Path, chars: str) -> dict[str, int]:
    """A character-level CLIP BPE vocabulary (no merges: every word is split into its characters,
    the last marked end-of-word) as vocab.json and merges.txt in `directory`."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return vocab


def build_text_encoder(spec, seed: int, directory: Path):
    """(tokenizer, frozen CLIPTextModel): a character-level vocabulary written to `directory`, and a
    text transformer initialized from `seed`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = write_char_vocab(directory, VOCAB_CHARS)
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                              model_max_length=spec.max_tokens)  # fmt: skip
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=spec.hidden, intermediate_size=4 * spec.hidden,
                            num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                            max_position_embeddings=spec.max_tokens, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=spec.hidden)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPTextModel(config).eval().requires_grad_(False)
    return tokenizer, encoder


@torch.no_grad()
def encode_texts(tokenizer, encoder, texts: list[str]) -> torch.Tensor:
    """The last hidden states [N, max_tokens, hidden], as StableDiffusionPipeline.encode_prompt gives them."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    return encoder(ids)[0]


class TextTeacherTraining(TeacherTraining):
    name = "text-teacher"

    def __init__(self, recipe, dist):
        super().__init__(recipe, dist)
        require_diffusers()
        d = recipe.data
        self.dataset = open_dataset(d.path, d.format, d.labels, d.max_images, d.resolution)
        if self.dataset.labels is None:
            raise UserError(f"{d.path}: data.labels is true but the dataset has no labels")
        self.img_shape = tuple(self.dataset.shape())
        self.prompts_by_class = class_prompts(recipe)
        classes = sorted(set(int(c) for c in self.dataset.labels[: len(self.dataset)]))
        missing = [c for c in classes if c not in self.prompts_by_class]
        if missing:
            raise UserError(f"prompts: no phrasing for class {missing[0]} of {d.path}")
        # Prompt table: every phrasing of every class, then the empty prompt (the unconditional row).
        self.prompt_list = [p for c in sorted(self.prompts_by_class) for p in self.prompts_by_class[c]]
        # phrasing[c, j]: the table row of class c's j-th phrasing (-1 past its last); phrasings[c]: how many.
        width = max(len(v) for v in self.prompts_by_class.values())
        self.phrasing = torch.full((max(self.prompts_by_class) + 1, width), -1, dtype=torch.long)
        first = 0
        for c in sorted(self.prompts_by_class):
            k = len(self.prompts_by_class[c])
            self.phrasing[c, :k] = torch.arange(first, first + k)
            first += k
        self.phrasings = (self.phrasing >= 0).sum(1)
        with tempfile.TemporaryDirectory() as tmp:  # the tokenizer reads its files when made
            seed = derive_seed(recipe.seed, "text")
            self.tokenizer, self.text_encoder = build_text_encoder(recipe.text_encoder, seed, Path(tmp))
        emb = encode_texts(self.tokenizer, self.text_encoder, [*self.prompt_list, ""])
        self.table = emb.flatten(1).to(self.device)  # [P + 1, L * D]; the last row is the empty prompt
        cond = {"seq_len": emb.shape[1], "dim": emb.shape[2], "pooled": 0}
        u, s = recipe.unet, recipe.schedule
        c, h, w = self.img_shape
        config = {"sample_size": h, "in_channels": c, "out_channels": c, "layers_per_block": u.layers_per_block,
                  "block_out_channels": list(u.block_out_channels), "down_block_types": list(u.down_block_types),
                  "up_block_types": list(u.up_block_types), "cross_attention_dim": emb.shape[2],
                  "attention_head_dim": u.attention_head_dim, "norm_num_groups": u.norm_num_groups}  # fmt: skip
        torch.manual_seed(derive_seed(recipe.seed, "init"))  # fresh weights are a function of the seed
        try:
            net = DiffusersUNet(config, cond)
        except (TypeError, ValueError) as e:
            raise UserError(f"unet: cannot build a UNet2DConditionModel for {self.img_shape} images ({e})") from None
        den = DiffusersVPPrecond(net, self.img_shape, self.table.shape[1], s.num_train_timesteps, s.beta_start,
                                 s.beta_end, s.beta_schedule, "epsilon", sigma_data=0.5)  # fmt: skip
        den.arch = {"arch": "diffusers-unet", "arch_kwargs": {"config": config, "cond": cond, "time_ids": None}}
        self.start(den, self.dataset)

    def configs(self) -> dict:
        return {"net": self.net.config(), "dataset": str(self.recipe.data.path), "prompts": self.prompts_by_class}

    def captions(self, draws, y: torch.Tensor, rows: slice) -> torch.Tensor:
        """Per sample: the table row of one of its class's phrasings, or (with probability
        prompt_dropout) the empty prompt's row."""
        n = self.batching.global_size
        k = self.phrasings.to(y.device)[y]
        j = (draws.uniform("text/phrasing", (n,), rows) * k).long().clamp_max(k - 1)
        idx = self.phrasing.to(y.device)[y, j]
        drop = draws.uniform("text/dropout", (n,), rows) < self.recipe.prompt_dropout
        return torch.where(drop, torch.full_like(idx, len(self.prompt_list)), idx)

    def train_step(self, iteration: int) -> dict[str, torch.Tensor]:
        """Epsilon loss at uniform integer timesteps, as diffusers trains: (1 / sigma^2) ||D - x0||^2."""
        n, shape = self.batching.global_size, (self.batching.global_size, *self.img_shape)
        grid = self.net.grid.to(self.device)

        def inputs(draws, x0, y, rows):
            t = draws.integers("ddpm/t", len(grid), n, rows)
            return grid[t].float(), draws.normal("ddpm/noise", shape, rows), self.table[self.captions(draws, y, rows)]

        return self.denoising_step(iteration, inputs)

    # -- outputs ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def preview(self, path: Path) -> None:
        """One row per class (its first phrasing), guided at scale 2, 18 Heun steps."""
        from ..plots import save_image_grid
        from ..rng import PerSeedRandom
        from ..solvers import edm_sampler
        from ..teachers.diffusers_pipeline import GuidedDenoiser

        classes = sorted(self.prompts_by_class)
        per = max(1, self.recipe.logging.grid_size // len(classes))
        idx = torch.tensor([int(self.phrasing[c, 0]) for c in classes for _ in range(per)], device=self.device)
        rng = PerSeedRandom(list(range(len(idx))), self.device)
        z = rng.randn(self.img_shape)
        guided = GuidedDenoiser(self.net_ema, self.table[-1], 2.0, None)
        x = edm_sampler(guided, z, self.table[idx], rng, num_steps=18, sigma_max=self.net_ema.sigma_max,
                        dtype=torch.float32)  # fmt: skip
        save_image_grid(x, path, nrow=per)

    def export(self, directory: Path, use_ema: bool = True) -> Path:
        """A diffusers pipeline directory: the UNet, the text encoder and its tokenizer, a scheduler
        with the training schedule, and prompts.txt (every phrasing) + prompts.json (by class)."""
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        net = (self.net_ema if use_ema else self.net).network
        unet = type(net.model).from_config(dict(net.model.config))
        unet.load_state_dict(net.model.state_dict())
        s = self.recipe.schedule
        sched = EulerDiscreteScheduler(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start,
                                       beta_end=s.beta_end, beta_schedule=s.beta_schedule, prediction_type="epsilon",
                                       timestep_spacing="trailing", steps_offset=1)  # fmt: skip
        pipe = StableDiffusionPipeline(vae=None, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)  # fmt: skip
        directory = Path(directory)
        pipe.save_pretrained(directory, safe_serialization=True)
        (directory / "prompts.txt").write_text("".join(p + "\n" for p in self.prompt_list))
        (directory / "prompts.json").write_text(json.dumps({str(k): v for k, v in self.prompts_by_class.items()}))
        return directory
