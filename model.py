"""Vision-LSTM (ViL): patch embedding, a stack of mLSTM blocks of alternating direction, pooling of
the first and last token, a linear head. The blocks and the mLSTM maths are in mlstm.py (its module
docstring, parts 1 to 4); around them, with C image channels and D the model width:

    x = Conv2d(C -> D, kernel = stride = patch_size)(image)    S = rows * cols tokens, row-major
    x = x + pos_embed          learnable, one per patch, no class token; trunc-normal std 0.02 (resized
                               bilinearly for an image of another size than the config's)
    x = block_i(x), i < depth  blocks 0, 2, ... read from the top-left patch, 1, 3, ... from the bottom-right;
                               drop-path rate linear from 0 (first block) to drop_path (last)
    x = LayerNorm(x)           eps 1e-6
    pooled = [x_first, x_last]        "bilateral_concat" (ViL v2), 2 D wide
          or (x_first + x_last) / 2   "bilateral_avg" (ViL v1, the replaced repository's model), D wide
    logits = Linear(pooled)    weight trunc-normal std 2e-5, bias 0
The patch embedding is initialised as a linear map of the flattened patch (Xavier uniform, bias 0).
ViL v1 and v2 are the two model versions of the published Vision-LSTM code (NX-AI/vision-lstm,
vision_lstm.py and vision_lstm2.py): v2 pools by concatenation and puts a 3x3 conv on the patch grid.

    model = create_model("vil-t", num_classes=10, img_size=32)             # a named preset
    model = create_model("vil-1m", img_size=(28, 28), in_chans=1, depth=6)  # with overrides
    model = VisionLSTM(ViLConfig(**saved_config))                         # rebuilt from its config
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlstm import CONV_KINDS, MLSTM_FORMS, ViLBlock

POOLINGS = ("bilateral_concat", "bilateral_avg")
DOWN_PROJ_INITS = ("original", "fixed")


@dataclass
class ViLConfig:
    """Everything that defines a ViL model; plain values, so dataclasses.asdict(config) is json."""

    img_size: tuple = (32, 32)  # (height, width); an int means a square image
    in_chans: int = 3
    num_classes: int = 10
    patch_size: int = 4
    dim: int = 192  # model width D
    depth: int = 4  # number of single-direction blocks (the paper counts pairs as "layers")
    expansion: int = 2  # inner width = expansion * dim
    num_heads: int = 4  # mLSTM heads
    qkv_block_size: int = 4  # q/k/v maps are block-diagonal with blocks of this size
    drop_path: float = 0.0  # stochastic depth of the last block; linear from 0 over the blocks
    pooling: str = "bilateral_concat"  # or "bilateral_avg" (v1, the replaced repository's model)
    conv_kind: str = "2d"  # depthwise 3x3 on the patch grid, or "causal1d" (width 4 along the sequence)
    mlstm_form: str = "parallel"  # or "chunkwise" (linear memory in S), "recurrent" (reference)
    chunk_size: int = 64  # tokens per chunk of the chunkwise form
    down_proj_init: str = "original"  # std 2/sqrt(D), or "fixed": 2/(depth sqrt(D)), steadier when deep
    proj_bias: bool = True
    norm_bias: bool = True

    def __post_init__(self):
        # img_size comes back from json as a list, and create_model accepts an int
        size = self.img_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size):
            raise ValueError(f"img_size must be a positive int or (height, width), got {self.img_size!r}")
        self.img_size = size
        for name in ("in_chans", "num_classes", "patch_size", "dim", "depth", "expansion", "num_heads",
                     "qkv_block_size", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if any(side % self.patch_size for side in size):
            raise ValueError(f"patch_size {self.patch_size} does not divide the image size {size[0]}x{size[1]}; "
                             f"choose a patch size that divides both sides")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        for name, allowed in (("pooling", POOLINGS), ("conv_kind", CONV_KINDS), ("mlstm_form", MLSTM_FORMS),
                              ("down_proj_init", DOWN_PROJ_INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {allowed}")
        inner = self.expansion * self.dim
        if inner % self.num_heads or (inner // self.num_heads) % self.qkv_block_size:
            raise ValueError(f"inner width expansion*dim = {inner} must split into num_heads ({self.num_heads}) "
                             f"heads whose width is a multiple of qkv_block_size ({self.qkv_block_size}); "
                             f"with the defaults, choose a dim that is a multiple of 8")

    @property
    def patch_grid(self):
        """(rows, cols) of the token grid."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)


class VisionLSTM(nn.Module):
    """forward(x: (B, C, H, W) float) -> logits (B, num_classes). H and W are config.img_size's, or any other
    multiples of the patch size (the position embedding is then resized: position_embedding)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        dim, grid = config.dim, config.patch_grid
        self.patch_embed = nn.Conv2d(config.in_chans, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))  # one per patch, no class token
        # stochastic depth grows linearly over the blocks, from 0 to config.drop_path at the last one
        drop_rates = torch.linspace(0.0, config.drop_path, config.depth).tolist()
        down_proj_blocks = config.depth if config.down_proj_init == "fixed" else 1
        self.blocks = nn.ModuleList(
            # even blocks read from the top-left patch, odd blocks from the bottom-right one
            ViLBlock(dim, "top_left" if index % 2 == 0 else "bottom_right", grid, drop_path=drop_rates[index],
                     conv_kind=config.conv_kind, mlstm_form=config.mlstm_form, chunk_size=config.chunk_size,
                     norm_bias=config.norm_bias, expansion=config.expansion, num_heads=config.num_heads,
                     qkv_block_size=config.qkv_block_size, proj_bias=config.proj_bias,
                     down_proj_blocks=down_proj_blocks)
            for index in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6, bias=config.norm_bias)
        head_in = 2 * dim if config.pooling == "bilateral_concat" else dim
        self.head = nn.Linear(head_in, config.num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        # patch embedding as a linear map of the flattened patch (as ViT/ViL do)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.config.dim, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def position_embedding(self, patch_grid):
        """(1, S, D) for a grid of (rows, cols) patches: the learned one, or for an image of another size than
        config.img_size the learned grid resized to that grid (bilinear, as FlexiViT resizes it), through which
        a lower-resolution training step (training.py, --low-res) trains the learned one."""
        if patch_grid == self.config.patch_grid:
            return self.pos_embed
        table = self.pos_embed.transpose(1, 2).reshape(1, self.config.dim, *self.config.patch_grid)
        table = F.interpolate(table, size=patch_grid, mode="bilinear", align_corners=False)
        return table.flatten(2).transpose(1, 2)

    def forward(self, x):
        size, patch = tuple(x.shape[-2:]), self.config.patch_size
        if size[0] % patch or size[1] % patch:
            raise ValueError(f"image size {size[0]}x{size[1]} is not a multiple of the patch size {patch}")
        x = self.patch_embed(x)  # (B, D, rows, cols)
        patch_grid = tuple(x.shape[-2:])
        # (B, S, D), row-major patches, laid out token-major: the transposed view alone would pass its (B, D, S)
        # memory order on to the sums after it, so that every block's norm would copy its input first and the
        # residual sums and their gradients would run on strided tensors (a bf16 training step on a CPU 2.6% slower)
        x = x.flatten(2).transpose(1, 2).contiguous() + self.position_embedding(patch_grid)
        for block in self.blocks:
            x = block(x, patch_grid)
        x = self.norm(x)
        if self.config.pooling == "bilateral_concat":
            pooled = torch.cat([x[:, 0], x[:, -1]], dim=-1)  # (B, 2 D)
        else:
            pooled = (x[:, 0] + x[:, -1]) / 2  # (B, D)
        return self.head(pooled)

    def num_params(self):
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())

    def param_groups(self, weight_decay):
        """Parameter groups for torch.optim.AdamW (decay_groups): matrices and kernels decay; biases, norms,
        the skip vector, gate biases and the position embedding do not."""
        return decay_groups(self, weight_decay)

    def flops_per_image(self):
        """Forward FLOPs for one image (2 per multiply-add), counting the matrix products and convs;
        the elementwise work (gates, norms, activations) is left out, as in the usual ViT counts."""
        c = self.config
        seq_len = c.patch_grid[0] * c.patch_grid[1]
        inner = c.expansion * c.dim
        head_dim = inner // c.num_heads
        conv_taps = 9 if c.conv_kind == "2d" else 4
        per_token = (
            c.dim * 2 * inner  # up-projection
            + inner * conv_taps  # depthwise conv
            + 3 * inner * c.qkv_block_size  # block-diagonal q, k, v
            + 3 * inner * 2 * c.num_heads  # input and forget gates
            + inner * c.dim  # down-projection
        )
        if c.mlstm_form == "parallel":
            # q k^T and the decay-weighted sum over v, each S x S x DH per head
            mlstm = 2 * seq_len * seq_len * head_dim * c.num_heads
        elif c.mlstm_form == "chunkwise":
            chunk = min(c.chunk_size, seq_len)
            # inside the chunks, plus reading (q C, q n) and writing (k^T v) the carried state
            mlstm = 2 * seq_len * chunk * head_dim * c.num_heads + 2 * seq_len * head_dim * head_dim * c.num_heads
        else:
            # per token: update C (DH^2) and read C q (DH^2)
            mlstm = 2 * seq_len * head_dim * head_dim * c.num_heads
        blocks = c.depth * (seq_len * per_token + mlstm)
        embed = seq_len * c.in_chans * c.patch_size ** 2 * c.dim
        head = self.head.in_features * c.num_classes
        return 2 * (blocks + embed + head)


PRESETS = {
    # the 1M-parameter, 4-block model whose figures the replaced repository reports (32 px, patch 4);
    # its pooling was bilateral_avg
    "vil-1m": dict(patch_size=4, dim=192, depth=4),
    # ViL-T/S/B of the paper (24 blocks = 12 pairs), with patch 4 for small (32 px) images
    "vil-t": dict(patch_size=4, dim=192, depth=24),
    "vil-s": dict(patch_size=4, dim=384, depth=24),
    "vil-b": dict(patch_size=4, dim=768, depth=24),
}
PRESET_ALIASES = {"vil-seed": "vil-1m"}  # earlier names, which saved runs and scripts may still use


def decay_groups(module, weight_decay):
    """Parameter groups of module for torch.optim.AdamW: the parameters of two or more dimensions (matrices and
    kernels) but the position embedding (pos_embed) decay by weight_decay, the others (biases, norm weights and
    other vectors) not."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.ndim >= 2 and name != "pos_embed":
            decay.append(param)
        else:
            no_decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_model(name, num_classes=10, in_chans=3, img_size=32, **overrides):
    """Build the preset `name` for images of img_size (int or (H, W)) with in_chans channels;
    overrides replace any ViLConfig field. Raises ValueError for an unknown preset or field or an
    impossible configuration."""
    return VisionLSTM(preset_config(name, num_classes, in_chans, img_size, **overrides))


def preset_config(name, num_classes=10, in_chans=3, img_size=32, **overrides):
    """The ViLConfig that create_model builds (same arguments), without building the model: a cheap check
    that the configuration is possible. Raises ValueError as create_model does."""
    name = PRESET_ALIASES.get(name, name)
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(PRESETS)}")
    fields = {field.name for field in dataclasses.fields(ViLConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; the options are {sorted(fields)}")
    settings = dict(PRESETS[name], num_classes=num_classes, in_chans=in_chans, img_size=img_size)
    settings.update(overrides)
    return ViLConfig(**settings)
