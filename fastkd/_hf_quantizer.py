"""fastkd's transformers quantization config and quantizer (imports transformers; see hf.py)."""

from __future__ import annotations

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import FORMAT, decompress_, rebuild_compressed
from .hf import QUANT_METHOD, record
from .nn.int8_linear import align_int8_codes


class FastkdConfig(QuantizationConfigMixin):
    """The compressed layers and widths of a model fastkd changed (``save_compressed``'s
    header), as a transformers ``quantization_config`` (``quant_method="fastkd"``)."""

    def __init__(self, layers=None, shapes=None, format=FORMAT, shrunk=False, **kwargs):
        if format != FORMAT:
            raise ValueError(f"unsupported fastkd checkpoint format {format!r}; this fastkd "
                             f"reads {FORMAT!r}")
        self.quant_method = QUANT_METHOD
        self.format = format
        self.layers = dict(layers or {})
        self.shapes = dict(shapes or {})
        self.shrunk = bool(shrunk)

    def header(self) -> dict:
        return {"format": self.format, "layers": self.layers, "shapes": self.shapes}


def _key_renamer(model):
    """transformers' own renaming of checkpoint keys for ``model``'s class (a ``CLIPModel``
    checkpoint loaded as ``CLIPVisionModel`` drops its ``vision_model.`` prefix), as a function
    of one key; None where this transformers has no such renaming for it."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (WeightConverter, WeightRenaming,
                                                     rename_source_key)

        transforms = get_model_conversion_mapping(model)
    except Exception:  # older/newer transformers: the prefix logic below is all there is
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return None

    def rename(key):
        try:
            return rename_source_key(key, renamings, converters)[0]
        except Exception:
            return key

    return rename


def _translated(model, header: dict) -> dict:
    """The header's module paths as ``model`` names them: a checkpoint saved from a model with
    a head (``model.layers.0...``) loads into its base model (``layers.0...``) and back, and a
    class whose weights transformers renames while loading (CLIP's vision and text towers) gets
    the same renaming, as transformers does for the weights; paths of modules ``model`` does not
    have (the head, for a base model) are dropped, as transformers drops their weights."""
    names = {name for name, _ in model.named_modules()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    rename = _key_renamer(model)

    def placed(path):
        if path in names:
            return path
        if prefix and path.startswith(prefix + ".") and path[len(prefix) + 1:] in names:
            return path[len(prefix) + 1:]
        if prefix and f"{prefix}.{path}" in names:
            return f"{prefix}.{path}"
        return None

    def where(path):
        found = placed(path)
        if found is None and rename is not None:
            # a layer's weight key, renamed as transformers renames it, names the module
            renamed = rename(f"{path}.weight")
            if renamed != f"{path}.weight" and renamed.endswith(".weight"):
                found = placed(renamed[: -len(".weight")])
        return found

    def mapped(table):
        out = {}
        for path, value in table.items():
            name = where(path)
            if name is not None:
                out[name] = value
        return out

    shapes = {kind: mapped(table) for kind, table in header.get("shapes", {}).items()}
    return {"format": header["format"], "layers": mapped(header["layers"]), "shapes": shapes}


def _untie_compressed(model) -> None:
    """A head tied to the embeddings that fastkd compressed was saved untied (its codes are not
    the embedding's weight): drop the ties whose names are no longer parameters, or transformers
    would tie the embedding's float weight over the codes after loading."""
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers 5: {target: source}
    if not isinstance(tied, dict):
        return
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for target, source in list(tied.items()):
        if target not in params or source not in params:
            del tied[target]


class FastkdHfQuantizer(HfQuantizer):
    """Rebuilds fastkd's layers in the empty model ``from_pretrained`` made, before the weights
    load; records them again when the model is saved."""

    requires_calibration = True  # fastkd compresses loaded models; it loads only what it wrote

    def __init__(self, quantization_config, **kwargs):
        if not kwargs.get("pre_quantized", True):
            raise ValueError(
                "fastkd's quantization_config loads checkpoints that fastkd wrote; it does not "
                "compress float weights while loading. Load the float model, then call "
                "fastkd.quantize_ / sparsify_ / share_weights_ on it")
        super().__init__(quantization_config, **kwargs)

    def _process_model_before_weight_loading(self, model, dtype=None, **kwargs):
        if not isinstance(dtype, torch.dtype):  # transformers 5 passes None: the model was
            dtype = getattr(model, "dtype", None)  # built in the dtype it loads in
        header = _translated(model, self.quantization_config.header())
        rebuild_compressed(model, header, dtype=dtype if isinstance(dtype, torch.dtype)
                           and dtype.is_floating_point else None)
        _untie_compressed(model)

    def _process_model_after_weight_loading(self, model, **kwargs):
        # fastkd's layers take .half() / .to(dtype) (codes, masks and scales keep their dtype),
        # and train as they did before saving: not "quantized" in transformers' sense, which
        # would refuse both
        model.is_quantized = False
        align_int8_codes(model)  # the checkpoint's tensors are views at 8-byte offsets
        return model

    def get_state_dict_and_metadata(self, model, *args, **kwargs):
        record(model)  # save_pretrained: the layers as they are now
        return None, {}

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self):
        return True

    @property
    def is_qat_trainable(self):
        return True

    @property
    def is_compileable(self):
        return True

    def dequantize(self, model, dtype=None):
        """``model.dequantize()``: fastkd.decompress_ (plain float layers, widths kept)."""
        if dtype is None:  # transformers' default: the dtype the model was loaded in
            dtype = getattr(model, "dtype", None)
        decompress_(model, dtype=dtype)
        return model
