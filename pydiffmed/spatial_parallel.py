"""Spatial parallelism (issue 16, DESIGN §9): one volume, many processes. The volume — the sampler state and every
activation of the denoiser — is cut along depth (the first spatial axis) into slabs, one per rank of a
`torch.distributed` process group (gloo on CPU, NCCL on GPU), and each rank runs the whole sampling loop on its
slab.

    model = SpatialParallelUNet(unet, depth=D)            # every rank, same weights
    y = model(x[:, :, model.start:model.stop], t)         # this rank's slab of unet(x, t)
    volume = spatial_sample(unet, (B, C, D, H, W), "ddim", num_steps=50, seed=0)   # the whole volume, every rank
    image = spatial_decode(autoencoder, z)                # AutoencoderKL decode by latent slabs (also encode)

Why it is exact (the same numbers as one process, up to fp32 rounding):
* Slabs are cut in units of 2^(levels-1) rows (`slab_bounds`), so every level of the UNet has slab boundaries on
  whole rows: the stride-2 downsampling convolution, the 2×2×2 average pool of `resblock_updown` and the nearest
  ×2 upsampling all map a slab onto the matching slab of the next level.
* A convolution's output rows need its input rows plus a halo (one row for 3×3×3, one row before the slab for
  the strided downsampler, none for 1×1): the halo rows come from the neighbouring ranks (`batch_isend_irecv`)
  and are zero at the volume's ends, as the whole-volume convolution's zero padding. Communication overlaps
  computation: the halo is in flight while the rows that need none convolve; the boundary rows follow.
* GroupNorm (with the resnets' fused SiLU and time-embedding bias) needs the whole volume's mean and variance per
  (sample, group): each rank computes its slab's count, mean and centred second moment in fp64, one all-gather
  per norm layer exchanges them, every rank merges them in rank order (Chan et al., partition.GroupStats) and
  applies the normalisation to its slab (partition.GroupNormApply).
* Attention is over all D·H·W tokens; a depth slab is a contiguous token range, so each rank keeps its queries
  and all-gathers keys and values (SpatialAttentionBlock, and the self-attention of SpatialTransformer).
* An AutoencoderKL (SpatialParallelAutoencoder) is cut in whole latent rows; each of its upsamplings (nearest
  ×2 + convolution, or the 2×2×2 transposed convolution, which needs no halo) doubles every slab, each
  downsampling of the encoder (one zero row after the volume's end, a stride-2 convolution: one halo row after
  the slab) halves it. Its attention blocks gather keys and values as the UNet's do.
* The time embedding, class and cross-attention conditioning are per sample: replicated on every rank.
* The solver update (`ops.fused_step`) is elementwise and its Philox noise is indexed by the voxel of the whole
  volume (`noise_index`, passed by the engine's `slab=`), so a slab draws exactly the noise one process draws
  for those voxels. What is not elementwise in the solver path — dynamic thresholding (a per-sample quantile),
  Langevin corrector step sizes (per-sample norms) and posterior data steps — is refused under spatial
  parallelism.

Halo rows and statistics are small (one row per neighbour per convolution, 3·B·G numbers per norm); attention's
key/value gather is the one exchange that grows with the volume (2·C values per token, at the attention levels
only, where the volume is smallest).
"""
from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import ops
from .engine import _broadcast_to
from .models.attention_block import SpatialAttentionBlock
from .models.autoencoder import AutoencoderKL, DeconvUpsample
from .models.autoencoder import Downsample as AEDownsample
from .models.autoencoder import ResBlock as AEResBlock
from .models.autoencoder import Upsample as AEUpsample
from .models.layers import (Conv, add_linear_, avg_pool_2x, channels_last_format, conv_module, linear,
                            to_channels_last, upsample_conv, upsample_nearest)
from .models.transformer import SpatialTransformer, _add_projected, _attend
from .models.unet import Downsample, Upsample, UNet3D, time_projection
from .nn import GroupNorm3d
from .partition import GroupStats

_TAG_DOWN, _TAG_UP = 17, 18  # halo rows travelling to the next rank (deeper) / to the previous rank


# --- slabs ---------------------------------------------------------------------------------------------------

def slab_bounds(depth: int, world_size: int, unit: int = 1) -> list[tuple[int, int]]:
    """[start, stop) depth rows of each rank's slab: the volume's `depth` rows cut in whole units of `unit` rows
    (2^(levels-1) for a UNet), as equal as possible, the larger slabs first. ValueError when depth is not a
    multiple of unit or there are fewer units than ranks (a rank would get no rows)."""
    for name, value in (("depth", depth), ("world_size", world_size), ("unit", unit)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if depth % unit:
        raise ValueError(f"depth {depth} is not a multiple of {unit}: slabs are cut in units of {unit} rows (the "
                         f"model halves the volume {int(math.log2(unit))} times)")
    units = depth // unit
    if units < world_size:
        raise ValueError(f"depth {depth} has {units} unit(s) of {unit} rows for {world_size} ranks: every rank needs "
                         f"at least one unit; use at most {units} ranks or a deeper volume")
    base, extra = divmod(units, world_size)
    bounds, start = [], 0
    for rank in range(world_size):
        stop = start + (base + (rank < extra)) * unit
        bounds.append((start, stop))
        start = stop
    return bounds


class _Group:
    """This rank's place in `group` (None: the default group) and the global ranks of its neighbours."""

    def __init__(self, group):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("spatial parallelism needs an initialised torch.distributed process group "
                               "(torch.distributed.init_process_group: gloo on CPU, nccl on GPU)")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def global_rank(self, rank):
        return rank if self.group is None else dist.get_global_rank(self.group, rank)


class _Halo:
    """The halo rows of one activation slab in flight: this rank receives `before` rows from the previous rank
    (its last rows) and `after` rows from the next (its first rows), and sends its own to them. wait() gives
    (rows before, rows after), zero rows at the volume's ends, None for a side without a halo."""

    def __init__(self, comm: _Group, x: torch.Tensor, before: int, after: int):
        self.x, self.before, self.after = x, before, after
        self.recv_before = self.recv_after = None
        first, last = comm.rank == 0, comm.rank == comm.world_size - 1
        p2p, self._keep = [], []

        def shape(rows):
            return (x.shape[0], x.shape[1], rows, *x.shape[3:])

        if before and not first:
            self.recv_before = x.new_empty(shape(before))
            p2p.append(dist.P2POp(dist.irecv, self.recv_before, comm.global_rank(comm.rank - 1), comm.group,
                                  _TAG_DOWN))
        if after and not last:
            self.recv_after = x.new_empty(shape(after))
            p2p.append(dist.P2POp(dist.irecv, self.recv_after, comm.global_rank(comm.rank + 1), comm.group,
                                  _TAG_UP))
        if before and not last:
            rows = x[:, :, x.shape[2] - before:].contiguous()
            self._keep.append(rows)
            p2p.append(dist.P2POp(dist.isend, rows, comm.global_rank(comm.rank + 1), comm.group, _TAG_DOWN))
        if after and not first:
            rows = x[:, :, :after].contiguous()
            self._keep.append(rows)
            p2p.append(dist.P2POp(dist.isend, rows, comm.global_rank(comm.rank - 1), comm.group, _TAG_UP))
        self._requests = dist.batch_isend_irecv(p2p) if p2p else []

    def wait(self):
        for request in self._requests:
            request.wait()
        self._requests, self._keep = [], []
        x = self.x

        def rows(received, count):
            if not count:
                return None
            if received is None:  # the volume's end: the zero padding of the whole-volume convolution
                return x.new_zeros((x.shape[0], x.shape[1], count, *x.shape[3:]))
            return received.to(memory_format=channels_last_format(x.ndim))

        return rows(self.recv_before, self.before), rows(self.recv_after, self.after)


def _cat_rows(pieces):
    pieces = [p for p in pieces if p is not None]
    return pieces[0] if len(pieces) == 1 else to_channels_last(torch.cat(pieces, dim=2))


# --- the model -----------------------------------------------------------------------------------------------

class _SlabModule(nn.Module):
    """What every spatial-parallel network shares: this rank's place in the group (`_comm`), the slab cut at the
    network's input (`bounds`, `rows`: this rank's rows there) and the layers by slabs — halo convolutions,
    GroupNorm with all-gathered statistics, self-attention with all-gathered keys and values. A level's slab
    depth is proportional to the input's (`_level_rows`): ×½ per downsampling, ×2 per upsampling."""

    @property
    def group(self):
        return self._comm.group

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    def __deepcopy__(self, memo):
        # the engine copies a model to convert its dtype or device; the process group is shared, never copied
        memo[id(self._comm)] = self._comm
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            object.__setattr__(new, name, copy.deepcopy(value, memo))
        return new

    def _check_slab_input(self, x, check, bounds, depth):
        """Every rank's input checked (check(x) raises TypeError/ValueError on a bad one), and the verdict shared
        (one small all-gather): either every rank raises the same ValueError or none does — a rank raising alone
        would leave the others waiting in a collective. Rank r's x must be rows bounds[r] of a depth-`depth`
        volume, the other sizes the same everywhere."""
        problem = None
        if not isinstance(x, torch.Tensor) or x.ndim > 7:
            problem = f"x must be a B×C×D×H×W tensor, got {type(x).__name__}"
        else:
            try:
                check(x)
            except (TypeError, ValueError) as error:
                problem = str(error)
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        sizes = tuple(x.shape) if problem is None else ()
        info = torch.tensor([problem is not None, len(sizes), *sizes, *[0] * (7 - len(sizes))], dtype=torch.int64)
        if self.world_size > 1:
            pieces = [torch.empty_like(info, device=device) for _ in range(self.world_size)]
            dist.all_gather(pieces, info.to(device), group=self.group)
            table = torch.stack(pieces).cpu().tolist()
        else:
            table = [info.tolist()]
        if problem is not None:
            raise ValueError(f"rank {self.rank}: {problem}")
        failed = [r for r, row in enumerate(table) if row[0]]
        if failed:
            raise ValueError(f"rank(s) {failed} rejected their input (see their errors)")
        shapes = [tuple(row[2:2 + row[1]]) for row in table]
        expected = [(*sizes[:2], stop - start, *sizes[3:]) for start, stop in bounds]
        if shapes != expected:
            raise ValueError(f"the ranks' inputs have shapes {shapes}; the depth-{depth} volume cut by "
                             f"{bounds} needs {expected} (rank r holds x[:, :, start_r:stop_r])")

    # -- volumes ----------------------------------------------------------------------------------------------
    def slab(self, volume: torch.Tensor) -> torch.Tensor:
        """This rank's slab (a view) of a whole volume B×C×D×... (depth: dimension 2)."""
        if volume.ndim < 3 or volume.shape[2] != self.depth:
            raise ValueError(f"expected a volume of depth {self.depth} (dimension 2), got shape {tuple(volume.shape)}")
        return volume[:, :, self.start:self.stop]

    def gather(self, slab: torch.Tensor) -> torch.Tensor:
        """The whole volume from every rank's slab, on every rank (a collective)."""
        return gather_slabs(slab, self.bounds, self._comm)

    # -- distributed pieces -----------------------------------------------------------------------------------
    def _self_attention_block(self, block, x):
        """SpatialAttentionBlock.forward_volume with all-gathered keys and values."""
        b, c = x.shape[:2]
        n = math.prod(x.shape[2:])
        attn = block.attn
        h = self._group_norm(x, block.norm, token_major=True)
        weight, bias = attn.fused_qkv(h.dtype, h.device)
        qkv = linear(h, weight, bias).view(b, n, 3, attn.num_heads, attn.dim_head)
        kv = self._gather_tokens(qkv[:, :, 1:].reshape(b, n, 2 * c), x.shape[2])
        kv = kv.view(b, kv.shape[1], 2, attn.num_heads, attn.dim_head)
        q, k, v = qkv[:, :, 0], kv[:, :, 0], kv[:, :, 1]
        if attn.attention_dtype is not None and attn.attention_dtype != h.dtype:
            q, k, v = (t.to(attn.attention_dtype) for t in (q, k, v))
        out = ops.attention(q, k, v, scale=attn.scale, layout="bnhd").view(b * n, c).to(h.dtype)
        y = torch.empty_like(x, memory_format=channels_last_format(x.ndim))
        y_tokens = y.movedim(1, -1).view(b, n, c)
        x_tokens = x.movedim(1, -1).reshape(b, n, c)
        if attn.include_fc:
            torch.add(x_tokens, attn.out_proj.bias.to(y.dtype), out=y_tokens)
            add_linear_(y_tokens.view(b * n, c), out, attn.out_proj.weight.to(y.dtype), b)
        else:
            torch.add(x_tokens, out.view(b, n, c), out=y_tokens)
        return y

    def _level_rows(self, rows: int) -> list[int]:
        """Every rank's slab depth at the level where this rank's slab has `rows` rows."""
        return [(stop - start) * rows // self.rows for start, stop in self.bounds]

    def _gather_tokens(self, tokens: torch.Tensor, rows: int) -> torch.Tensor:
        """B×n×F token rows of this rank's slab (`rows` depth rows at this level) → B×N×F of the whole volume,
        in token (depth-major) order, on every rank."""
        comm = self._comm
        if comm.world_size == 1:
            return tokens
        b, n, f = tokens.shape
        per_row = n // rows
        counts = [r * per_row for r in self._level_rows(rows)]
        most = max(counts)
        send = tokens.contiguous()
        if n != most:  # all_gather moves equal sizes: pad, then drop the padding
            send = tokens.new_zeros((b, most, f))
            send[:, :n] = tokens
        pieces = [torch.empty_like(send) for _ in range(comm.world_size)]
        dist.all_gather(pieces, send, group=comm.group)
        return torch.cat([piece[:, :count] for piece, count in zip(pieces, counts)], dim=1)

    def _group_norm(self, x, norm, act=None, bias_nc=None, token_major=False):
        """act(GroupNorm(x + bias_nc)·γ + β) with the whole volume's statistics: this slab's per-(sample, group)
        count, mean and centred second moment (fp64) are all-gathered and merged in rank order, identically on
        every rank; the apply phase is partition.GroupNormApply (fp32). token_major: B×n×C output."""
        n, c = x.shape[:2]
        groups, per_group = norm.num_groups, c // norm.num_groups
        elements, group_mean, group_m2 = GroupStats.tile_statistics(x, groups, bias_nc)
        count = math.prod(x.shape[2:])
        local = torch.stack([group_mean, group_m2], dim=-1)
        stats = GroupStats(groups)
        if self._comm.world_size == 1:
            pieces, counts = [local], [elements]
        else:
            pieces = [torch.empty_like(local) for _ in range(self._comm.world_size)]
            dist.all_gather(pieces, local, group=self._comm.group)
            plane = count // x.shape[2]
            counts = [rows * plane * per_group for rows in self._level_rows(x.shape[2])]
        for piece, elements in zip(pieces, counts):  # rank order: the same merge, the same numbers on every rank
            stats.merge(elements, piece[..., 0], piece[..., 1])
        apply = stats.normalizer(norm, act or None)
        if bias_nc is not None:  # (x + b − μ)·s = (x − (μ − b))·s
            apply.mean = apply.mean - bias_nc.double()
        if token_major:
            out = torch.empty((n, *x.shape[2:], c), dtype=x.dtype, device=x.device)
            apply(x, out.movedim(-1, 1))
            return out.view(n, count, c)
        out = torch.empty_like(x, memory_format=channels_last_format(x.ndim))
        apply(x, out)
        return out

    def _conv(self, x, conv, add=None):
        """conv(x) (+ add) of the whole volume, this slab's rows: halo rows from the neighbours, exchanged while
        the rows that need none convolve."""
        kernel, stride, padding = conv.kernel_size, conv.stride, conv.padding
        if (isinstance(padding, str) or len(set(kernel)) != 1 or len(set(stride)) != 1 or len(set(padding)) != 1
                or set(conv.dilation) != {1} or conv.groups != 1):
            raise ValueError(f"spatial parallelism handles convolutions with one kernel size, stride and padding on "
                             f"every axis, no dilation or groups; got {conv}")
        k, s, p = kernel[0], stride[0], padding[0]
        before, after = p, k - s - p
        if after < 0 or x.shape[2] % s:
            raise ValueError(f"cannot cut {conv} by depth slabs of {x.shape[2]} rows")
        pads = [0] + [p] * (x.ndim - 3)

        def compute(piece, add_piece, out=None):
            return conv_module(piece, conv, add=add_piece, padding=pads, out=out)

        if before == 0 and after == 0:
            return compute(x, add)
        rows = (before + x.shape[2] + after - k) // s + 1
        out_shape = (x.shape[0], conv.out_channels, rows, *((n + 2 * p - k) // s + 1 for n in x.shape[3:]))
        return self._windowed(x, before, after, k, s, 1, compute, add, out_shape)

    def _upsample_conv(self, x, conv):
        """conv(nearest_upsample_×2(x)) (layers.upsample_conv) of the whole volume, this slab's rows: low-res row
        i gives output rows 2i, 2i + 1 from rows i − 1 … i + 1."""
        pads = [0] + [1] * (x.ndim - 3)
        return self._windowed(x, 1, 1, 3, 1, 2, lambda piece, _: upsample_conv(piece, conv, padding=pads), None)

    def _windowed(self, x, before, after, kernel, stride, scale, compute, add, out_shape=None):
        """compute(piece, add rows) over P = [`before` halo rows, x, `after` halo rows] without depth padding:
        output position j reads P[j·stride : j·stride + kernel] and gives `scale` output rows. The positions that
        read only x are computed while the halo is in flight, the others once it has arrived. out_shape (given
        when compute takes a third argument, the rows of the output to write: convolutions): the pieces are
        written into one output of that shape instead of being concatenated, so no row exists twice."""
        if self._comm.world_size > 1 and any(r < max(before, after) for r in self._level_rows(x.shape[2])):
            raise ValueError("a slab is thinner than a convolution's halo")
        halo = _Halo(self._comm, x, before, after)
        d = x.shape[2]
        positions = (before + d + after - kernel) // stride + 1
        lo = -(-before // stride)  # the first position reading no halo row
        hi = (before + d - kernel) // stride  # the last one
        out = None if out_shape is None else torch.empty(out_shape, dtype=x.dtype, device=x.device,
                                                         memory_format=channels_last_format(x.ndim))
        pieces = {}

        def run(piece, a, b):  # output positions [a, b)
            rows = (a * scale, b * scale)
            add_rows = None if add is None else add[:, :, rows[0]:rows[1]]
            if out is None:
                pieces[a] = compute(piece, add_rows)
            else:
                compute(piece, add_rows, out[:, :, rows[0]:rows[1]])

        if lo > hi:  # every position reads a halo row
            prev, nxt = halo.wait()
            run(_cat_rows([prev, x, nxt]), 0, positions)
        else:
            run(x[:, :, lo * stride - before:hi * stride + kernel - before], lo, hi + 1)
            prev, nxt = halo.wait()
            if lo > 0:
                run(_cat_rows([prev, x[:, :, :(lo - 1) * stride + kernel - before]]), 0, lo)
            if hi + 1 < positions:
                run(_cat_rows([x[:, :, (hi + 1) * stride - before:], nxt]), hi + 1, positions)
        return out if out is not None else _cat_rows([pieces[a] for a in sorted(pieces)])


class SpatialParallelUNet(_SlabModule):
    """A `UNet3D` run by depth slabs across the ranks of `group` (default: the default process group): called on
    this rank's slab x[:, :, start:stop] of the model input, it returns the same slab of unet(x, ...) (up to fp32
    rounding). Every rank of the group must call it together with the same timesteps and conditioning.

    depth: the depth (first spatial size) of the whole volume. Its slab cut is `slab_bounds(depth, world_size,
    2^(levels-1))`; `bounds`, `start`, `stop` and `rows` describe it. `slab(volume)` cuts this rank's slab out of
    a whole volume, `gather(slab)` puts the whole volume together on every rank.

    forward(x, timesteps, context=None, class_labels=None, down_block_additional_residuals=None,
    mid_block_additional_residual=None): as UNet3D.forward, with x and the ControlNet residuals (if given) this
    rank's slabs. Inference only."""

    def __init__(self, unet: UNet3D, depth: int, group=None):
        super().__init__()
        if not isinstance(unet, UNet3D):
            raise TypeError(f"SpatialParallelUNet runs a pydiffmed UNet3D (UNet3D.from_monai converts MONAI's "
                            f"DiffusionModelUNet), got {type(unet).__name__}")
        self.unet = unet
        self._comm = _Group(group)
        self.unit = 2 ** (len(unet.block_out_channels) - 1)
        self.bounds = slab_bounds(depth, self._comm.world_size, self.unit)
        self.depth = int(depth)
        self.start, self.stop = self.bounds[self._comm.rank]
        self.rows = self.stop - self.start

    # -- forward ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor, timesteps, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, down_block_additional_residuals=None,
                mid_block_additional_residual: torch.Tensor | None = None) -> torch.Tensor:
        unet = self.unet
        self._check_ranks(x, context, class_labels)
        h, silu_emb = unet._embed(x, timesteps, context, class_labels, check=False)
        h = self._conv(h, unet.conv_in.conv)
        skips = [h]
        for level in unet.down_blocks:
            for j, resnet in enumerate(level.resnets):
                h = self._resnet(resnet, h, silu_emb)
                if len(level.attentions):
                    h = self._attention(level.attentions[j], h, context)
                skips.append(h)
            if level.downsampler is not None:
                h = self._sampler(level.downsampler, h, silu_emb)
                skips.append(h)
        if down_block_additional_residuals is not None:
            for i, residual in enumerate(down_block_additional_residuals[:len(skips)]):
                skips[i] = skips[i] + residual
        middle = unet.middle_block
        h = self._resnet(middle.resnet_1, h, silu_emb)
        h = self._attention(middle.attention, h, context)
        h = self._resnet(middle.resnet_2, h, silu_emb)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual
        for level in unet.up_blocks:
            for j, resnet in enumerate(level.resnets):
                h = self._resnet(resnet, torch.cat([h, skips.pop()], dim=1), silu_emb)
                if len(level.attentions):
                    h = self._attention(level.attentions[j], h, context)
            if level.upsampler is not None:
                h = self._sampler(level.upsampler, h, silu_emb)
        h = self._group_norm(h, unet.out[0], act="silu")
        return self._conv(h, unet.out[2].conv).contiguous()

    def _check_ranks(self, x, context, class_labels):
        """Every rank's input checked, and the verdict shared (one small all-gather): either every rank raises
        the same ValueError or none does — a rank raising alone would leave the others waiting in a collective.
        Each rank's x must be its slab, the other sizes the same everywhere."""
        self._check_slab_input(x, lambda t: self.unet._check_input(t, context, class_labels), self.bounds,
                               self.depth)

    # -- blocks -----------------------------------------------------------------------------------------------
    def _resnet(self, block, x, silu_emb):
        """models.unet.resnet_forward with distributed GroupNorm and halo convolutions."""
        h = self._group_norm(x, block.norm1, act="silu")
        if block.up:
            x = upsample_nearest(x)
            h = self._upsample_conv(h, block.conv1.conv)
        else:
            if block.down:
                x, h = avg_pool_2x(x), avg_pool_2x(h)
            h = self._conv(h, block.conv1.conv)
        h = self._group_norm(h, block.norm2, act="silu", bias_nc=time_projection(block, silu_emb))
        skip = block.skip_connection
        residual = x if isinstance(skip, nn.Identity) else self._conv(x, skip.conv)
        return self._conv(h, block.conv2.conv, add=residual)

    def _sampler(self, block, h, silu_emb):
        if isinstance(block, Downsample):
            return self._conv(h, block.op.conv)
        if isinstance(block, Upsample):
            return self._upsample_conv(h, block.postconv.conv)
        return self._resnet(block, h, silu_emb)  # resblock_updown

    def _attention(self, block, x, context):
        if isinstance(block, SpatialTransformer):
            return self._transformer(block, x, context)
        if not isinstance(block, SpatialAttentionBlock):
            raise TypeError(f"unsupported attention block {type(block).__name__}")
        return self._self_attention_block(block, x)

    def _transformer(self, block, x, context):
        """SpatialTransformer.forward with all-gathered self-attention keys and values."""
        b, c = x.shape[:2]
        rows = x.shape[2]
        tokens = self._group_norm(x, block.norm, token_major=True)
        w_in = block.proj_in.conv.weight
        tokens = linear(tokens, w_in.reshape(w_in.shape[0], -1), block.proj_in.conv.bias)
        for layer in block.transformer_blocks:
            attn1, attn2 = layer.attn1, layer.attn2
            h = layer.norm1(tokens)
            q, k, v = linear(h, attn1.fused_weight()).chunk(3, dim=-1)
            k, v = self._gather_tokens(torch.cat([k, v], dim=-1), rows).chunk(2, dim=-1)
            tokens = _add_projected(tokens, _attend(q, k, v, attn1.num_heads, attn1.scale, attn1.upcast),
                                    attn1.out_proj)
            h = layer.norm2(tokens)
            if context is None:  # MONAI's cross-attention without a context attends over the tokens themselves
                kv = linear(self._gather_tokens(h, rows), torch.cat([attn2.to_k.weight, attn2.to_v.weight]))
                k, v = kv.chunk(2, dim=-1)
                cross = _attend(linear(h, attn2.to_q.weight), k, v, attn2.num_heads, attn2.scale, attn2.upcast)
            else:
                cross = attn2(h, context)
            tokens = _add_projected(tokens, cross, attn2.out_proj)
            tokens = tokens + layer.ff(layer.norm3(tokens))
        n, inner = tokens.shape[1], tokens.shape[2]
        w_out = block.proj_out.conv.weight.reshape(c, inner)
        x_tokens = x.movedim(1, -1).reshape(b * n, c)
        y = torch.empty_like(x, memory_format=channels_last_format(x.ndim))
        y_tokens = y.movedim(1, -1).view(b * n, c)
        torch.add(x_tokens, block.proj_out.conv.bias, out=y_tokens)
        add_linear_(y_tokens, tokens.reshape(b * n, inner), w_out, b)
        return y


class SpatialParallelAutoencoder(_SlabModule):
    """An `AutoencoderKL`'s decoder (and encoder) run by depth slabs across the ranks of `group` (default: the
    default process group): every rank holds a slab of the latent and of every activation, convolutions exchange
    halo rows, GroupNorm statistics are all-gathered and merged, attention blocks (attention_levels, the non-local
    option) gather keys and values — the same numbers as one process's `decode` / `encode` (up to fp32 rounding).
    Every rank of the group builds it with the same arguments and calls it together.

    latent_depth: the latent's depth (first spatial size), cut `slab_bounds(latent_depth, world_size)`: `bounds`,
    `start`, `stop`, `rows` (latent rows). The image is 2^(levels-1) (`factor`) times deeper, and rank r holds
    image rows `image_bounds[r]` = factor × bounds[r] (each upsampling doubles a slab, each downsampling halves
    it). `slab(z)` / `image_slab(x)` cut this rank's slab out of a whole latent / image; `gather(z_slab)` and
    `gather_image(x_slab)` put the whole one together on every rank.

    decode(z_slab) → this rank's image slab; encode(x_slab) → this rank's (z_mu, z_sigma) slabs. Inference only."""

    def __init__(self, autoencoder: AutoencoderKL, latent_depth: int, group=None):
        super().__init__()
        self.factor = _latent_factor(autoencoder)
        self.autoencoder = autoencoder
        self._comm = _Group(group)
        self.bounds = slab_bounds(latent_depth, self._comm.world_size)
        self.depth = int(latent_depth)
        self.start, self.stop = self.bounds[self._comm.rank]
        self.rows = self.stop - self.start
        self.image_depth = self.depth * self.factor
        self.image_bounds = [(a * self.factor, b * self.factor) for a, b in self.bounds]
        self.image_start, self.image_stop = self.image_bounds[self._comm.rank]

    def image_slab(self, image: torch.Tensor) -> torch.Tensor:
        """This rank's slab (a view) of a whole image batch B×C×D×... (depth: dimension 2, factor × latent's)."""
        if image.ndim < 3 or image.shape[2] != self.image_depth:
            raise ValueError(f"expected an image of depth {self.image_depth} ({self.factor} × the latent's "
                             f"{self.depth}), got shape {tuple(image.shape)}")
        return image[:, :, self.image_start:self.image_stop]

    def gather_image(self, slab: torch.Tensor) -> torch.Tensor:
        """The whole image from every rank's image slab, on every rank (a collective)."""
        return gather_slabs(slab, self.image_bounds, self._comm)

    def _input(self, x, channels, what, bounds, depth):
        ae = self.autoencoder

        def check(t):
            if t.ndim != ae.spatial_dims + 2 or t.shape[1] != channels:
                raise ValueError(f"{what} must be B×{channels}×(spatial: {ae.spatial_dims} axes), got shape "
                                 f"{tuple(t.shape)}")

        self._check_slab_input(x, check, bounds, depth)
        return ae._input(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """This rank's slab image[:, :, image_start:image_stop] of autoencoder.decode(z), from its latent slab
        z[:, :, start:stop]."""
        ae = self.autoencoder
        h = self._input(z, ae.latent_channels, "the latent slab", self.bounds, self.depth)
        h = self._conv(h, ae.post_quant_conv.conv)
        return self._blocks(ae.decoder.blocks, h).contiguous()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slabs [:, :, start:stop] of autoencoder.encode(x) = (z_mu, z_sigma), from its image slab
        x[:, :, image_start:image_stop]."""
        ae = self.autoencoder
        h = self._input(x, ae.config["in_channels"], "the image slab", self.image_bounds, self.image_depth)
        h = self._blocks(ae.encoder.blocks, h)
        z_mu = self._conv(h, ae.quant_conv_mu.conv)
        z_log_var = torch.clamp(self._conv(h, ae.quant_conv_log_sigma.conv), -30.0, 20.0)
        return z_mu.contiguous(), torch.exp(z_log_var / 2).contiguous()

    def _blocks(self, blocks, h):
        """An Encoder's or Decoder's blocks on this rank's slab (models/autoencoder.py, block for block)."""
        for block in blocks:
            if isinstance(block, Conv):
                h = self._conv(h, block.conv)
            elif isinstance(block, AEResBlock):
                r = self._conv(self._group_norm(h, block.norm1, act="silu"), block.conv1.conv)
                r = self._group_norm(r, block.norm2, act="silu")
                skip = block.nin_shortcut
                residual = h if isinstance(skip, nn.Identity) else self._conv(h, skip.conv)
                h = self._conv(r, block.conv2.conv, add=residual)
            elif isinstance(block, SpatialAttentionBlock):
                h = self._self_attention_block(block, h)
            elif isinstance(block, AEUpsample):
                h = self._upsample_conv(h, block.postconv.conv)
            elif isinstance(block, DeconvUpsample):  # kernel 2, stride 2: each row makes two, no halo
                if block.deconv.kernel_size[0] != 2:  # MAISI's kernel 3 would need a halo
                    raise TypeError("SpatialParallelAutoencoder does not run a kernel-3 transposed convolution "
                                    "(MAISI's, convtranspose_kernel_size=3)")
                h = block(h)
            elif isinstance(block, AEDownsample):  # one zero row after the volume's end: one halo row after
                pad = (0, 1) * (h.ndim - 3) + (0, 0)
                h = self._windowed(h, 0, 1, 3, 2, 1, lambda piece, _: conv_module(F.pad(piece, pad), block.conv.conv),
                                   None)
            elif isinstance(block, GroupNorm3d):
                h = self._group_norm(h, block, act=block.act)
            else:
                raise TypeError(f"SpatialParallelAutoencoder does not know {type(block).__name__}")
        return h



def gather_slabs(slab: torch.Tensor, bounds, comm: _Group | None = None) -> torch.Tensor:
    """The whole volume (depth: dimension 2) from every rank's slab (rank r holds rows bounds[r]), on every rank."""
    comm = comm if comm is not None else _Group(None)
    rows = [stop - start for start, stop in bounds]
    if slab.shape[2] != rows[comm.rank]:
        raise ValueError(f"rank {comm.rank}'s slab has {slab.shape[2]} rows, expected {rows[comm.rank]}")
    most = max(rows)
    send = slab.contiguous()
    if slab.shape[2] != most:
        send = slab.new_zeros((*slab.shape[:2], most, *slab.shape[3:]))
        send[:, :, :slab.shape[2]] = slab
    pieces = [torch.empty_like(send) for _ in range(comm.world_size)]
    dist.all_gather(pieces, send, group=comm.group)
    return torch.cat([piece[:, :, :r] for piece, r in zip(pieces, rows)], dim=2)


# --- sampling ------------------------------------------------------------------------------------------------

def _agree(problem, comm: _Group):
    """Every rank's problem (an exception or None) shared: raise on every rank when any rank has one (a rank
    raising alone would leave the others waiting in the next collective)."""
    if comm.world_size == 1:
        if problem is not None:
            raise problem
        return
    gathered = [None] * comm.world_size
    dist.all_gather_object(gathered, None if problem is None else (type(problem), str(problem)), group=comm.group)
    if problem is not None:
        raise problem
    for rank, entry in enumerate(gathered):
        if entry is not None:
            kind, message = entry
            try:
                error = kind(f"rank {rank}: {message}")
            except Exception:
                error = RuntimeError(f"rank {rank}: {kind.__name__}: {message}")
            raise error


def _check_volume_input(name, t, shape):
    """A whole-volume input (mask, known, init, x_T) checked on every rank alike: it must broadcast to the
    volume's shape and be finite (a mask within [0, 1])."""
    _broadcast_to(name, t, shape)
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} has NaN/Inf values")
        if name == "mask" and bool(((t < 0) | (t > 1)).any()):
            raise ValueError("mask has values outside [0, 1] (1 where `known` is kept, 0 where new content is "
                             "sampled)")


class SpatialSampler:
    """A `Sampler` of whole volumes (B, C, D, H, W) whose every rank holds and samples one depth slab: the model
    runs as `SpatialParallelUNet`, the solver state is the slab, the noise is the whole volume's (the engine's
    `slab=`). Every rank of `group` constructs it and calls it together, with the same arguments; the result
    equals one process's sampling of the volume (up to fp32 rounding).

    model: a UNet3D (wrapped here) or a SpatialParallelUNet for depth D. solver, num_steps, schedule, dtype,
    state_dtype, guidance_scale, strength, nan_check, batch_invariant and solver options: as for `Sampler`.
    Refused: CUDA graphs (halo exchanges and all-gathers run eagerly), posterior sampling (measurement=),
    solvers whose updates need whole-volume numbers per sample (dynamic thresholding, Langevin correctors).
    check_memory: the engine's estimate for this rank's slab (of the bare UNet), agreed across ranks."""

    def __init__(self, model, solver, shape, *, group=None, check_memory=True, **options):
        from .engine import Sampler, _check_shape

        shape = _check_shape(shape)
        if len(shape) < 4:
            raise ValueError(f"shape must be (B, C, D, ...) with the depth D split across ranks, got {shape}")
        if options.get("cuda_graph"):
            raise ValueError("spatial parallelism runs eagerly: halo exchanges and all-gathers are not captured in "
                             "CUDA graphs (pass cuda_graph=False or leave it out)")
        options["cuda_graph"] = False
        if isinstance(model, SpatialParallelUNet):
            if model.depth != shape[2]:
                raise ValueError(f"the SpatialParallelUNet was built for depth {model.depth}, the shape has depth "
                                 f"{shape[2]}")
        else:
            model = SpatialParallelUNet(model, shape[2], group)
        self.model, self.shape = model, shape
        self._comm = model._comm
        local = (shape[0], shape[1], model.rows, *shape[3:])
        self.sampler = Sampler(model, solver, local, slab=(model.start, shape[2]), check_memory=False, **options)
        if check_memory:
            problem = None
            try:
                self.sampler.memory_estimate = self.sampler._check_memory(model.unet)
            except Exception as error:  # noqa: BLE001 - shared with every rank, then raised
                problem = error
            _agree(problem, self._comm)

    @property
    def bounds(self):
        return self.model.bounds

    def _slab_of(self, name, t):
        if t is None:
            return None
        _check_volume_input(name, t, self.shape)
        return torch.broadcast_to(t, self.shape)[:, :, self.model.start:self.model.stop]

    def __call__(self, seed=0, *, cond=None, uncond=None, mask=None, known=None, init=None, x_T=None,
                 callback=None, progress=False, gather=True):
        """Sample one batch of whole volumes: as `Sampler.__call__`, with mask, known, init and x_T given as whole
        volumes (each rank takes its slab) and callback(step, x0 slab) seeing this rank's slab. Returns the
        whole volumes on every rank (gather=True) or this rank's slab [:, :, start:stop] (gather=False)."""
        problem = None
        try:
            mask, known, init, x_T = (self._slab_of(name, t) for name, t in
                                      (("mask", mask), ("known", known), ("init", init), ("x_T", x_T)))
        except (TypeError, ValueError) as error:
            problem = error
        _agree(problem, self._comm)
        out = self.sampler.launch(seed, cond=cond, uncond=uncond, mask=mask, known=known, init=init, x_T=x_T,
                                  callback=callback, progress=progress and self._comm.rank == 0)
        problem = None
        try:
            self.sampler.raise_if_nonfinite()
        except (ValueError, FloatingPointError) as error:
            problem = error
        _agree(problem, self._comm)
        return gather_slabs(out, self.bounds, self._comm) if gather else out


def spatial_sample(model, shape, solver="dpmpp_2m", num_steps=None, schedule=None, seed=0, *, group=None,
                   gather=True, cond=None, uncond=None, mask=None, known=None, init=None, x_T=None, callback=None,
                   progress=False, **options):
    """`pydiffmed.sample` of whole volumes `shape` = (B, C, D, H, W) by depth slabs across the ranks of `group`
    (every rank calls it with the same arguments): see `SpatialSampler`. Returns the volumes on every rank, or
    this rank's slab with gather=False."""
    sampler = SpatialSampler(model, solver, shape, num_steps=num_steps, schedule=schedule, group=group, **options)
    return sampler(seed, cond=cond, uncond=uncond, mask=mask, known=known, init=init, x_T=x_T, callback=callback,
                   progress=progress, gather=gather)


def spatial_decode(autoencoder, z: torch.Tensor, *, group=None, gather: bool = True) -> torch.Tensor:
    """`autoencoder.decode(z)` by depth slabs across the ranks of `group` (every rank calls it with the same whole
    latent z): see `SpatialParallelAutoencoder`. Returns the whole image on every rank, or this rank's image slab
    with gather=False."""
    model = SpatialParallelAutoencoder(autoencoder, _depth_of(z, "z"), group)
    out = model.decode(model.slab(z))
    return model.gather_image(out) if gather else out


def spatial_encode(autoencoder, x: torch.Tensor, *, group=None, gather: bool = True):
    """`autoencoder.encode(x)` = (z_mu, z_sigma) by depth slabs across the ranks of `group` (every rank calls it
    with the same whole image x, whose depth must be a multiple of 2^(levels-1)): see `SpatialParallelAutoencoder`.
    Returns the whole latents on every rank, or this rank's latent slabs with gather=False."""
    depth = _depth_of(x, "x")
    factor = _latent_factor(autoencoder)
    if depth % factor:
        raise ValueError(f"the image's depth {depth} is not a multiple of {factor}: the encoder halves it "
                         f"{factor.bit_length() - 1} times and slabs are cut in whole latent rows")
    model = SpatialParallelAutoencoder(autoencoder, depth // factor, group)
    z_mu, z_sigma = model.encode(model.image_slab(x))
    return (model.gather(z_mu), model.gather(z_sigma)) if gather else (z_mu, z_sigma)


def _latent_factor(autoencoder) -> int:
    """How many times deeper an autoencoder's image is than its latent: 2^(levels-1)."""
    if not isinstance(autoencoder, AutoencoderKL):
        raise TypeError(f"SpatialParallelAutoencoder runs a pydiffmed AutoencoderKL (AutoencoderKL.from_monai "
                        f"converts MONAI's), got {type(autoencoder).__name__}")
    return 2 ** (len(autoencoder.config["channels"]) - 1)


def _depth_of(t, name):
    if not isinstance(t, torch.Tensor) or t.ndim < 4:
        raise ValueError(f"{name} must be a B×C×D×... tensor (depth: dimension 2), got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    return t.shape[2]


__all__ = ["SpatialParallelAutoencoder", "SpatialParallelUNet", "SpatialSampler", "gather_slabs", "slab_bounds",
           "spatial_decode", "spatial_encode", "spatial_sample"]
