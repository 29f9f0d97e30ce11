"""Create a model by name: registered plugin architectures first, then timm."""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .checkpoint import (OLD_FORMAT, export_from_checkpoint, find_checkpoint, open_checkpoint,
                         weights_of)
from .errors import FrzooError, shorten
from .plugins import ARCHITECTURES, plugin_error_hint, suggest, where_names_come_from


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Registered architectures and timm's, sorted, optionally filtered by a glob pattern."""
    import timm
    names = sorted(set(ARCHITECTURES.names()) | set(timm.list_models()))
    if pattern:
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        names = [n for n in names if fnmatch.fnmatch(n, glob)]
    return names


def create_model(name: str, kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Build ``name`` with ``kwargs``. Unknown names suggest the closest known ones."""
    kwargs = {k: v for k, v in (kwargs or {}).items() if v is not None}  # as timm: None = default
    if kwargs.get("pretrained"):
        raise FrzooError("model.kwargs.pretrained=true needs a model hub, which frzoo does not "
                         "contact; download the weights yourself and set model.init_checkpoint.")
    if name in ARCHITECTURES:
        builder = ARCHITECTURES.get(name)
    else:
        import timm
        if not timm.is_model(name):
            raise FrzooError(f"unknown model {shorten(name)}.{suggest(name, list_models(), n=5)} "
                             f"List models with `frzoo models PATTERN`. "
                             f"{where_names_come_from('Architectures other than timm models')}"
                             f"{plugin_error_hint()}")
        builder = lambda **kw: timm.create_model(name, pretrained=False, **kw)  # noqa: E731
    try:
        return builder(**kwargs)
    except TypeError as exc:
        if name in ARCHITECTURES and _binds(builder, kwargs) and not _raised_by(builder, exc):
            # The kwargs fit the signature and the builder itself did not refuse them: a bug
            # deeper inside the plugin's code. Keep its traceback and say whose code it is.
            if hasattr(exc, "add_note"):
                exc.add_note(f"frzoo: raised while building architecture '{name}', registered "
                             f"by {ARCHITECTURES.origin(name)}")
            raise
        raise FrzooError(f"model {shorten(name)} rejected model.kwargs {shorten(kwargs, 200)}: "
                         f"{shorten(exc, 300, quote=False)}") from exc


def _raised_by(fn: Any, exc: BaseException) -> bool:
    """Whether ``exc`` was raised in ``fn``'s own body (a builder refusing its kwargs)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code is getattr(fn, "__code__", None)


def _binds(fn: Any, kwargs: Dict[str, Any]) -> bool:
    import inspect
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError:
        return False
    except ValueError:  # no signature available
        return True
    return True


def load_init_checkpoint(model: nn.Module, path: str, what: str = "model.init_checkpoint") -> None:
    """Load weights in the model's own parameter names, without executing pickled code: from a
    state_dict file (final.pt, `frzoo export`), a run folder (its newest checkpoint) or a
    checkpoint of either format (frzoo.checkpoint); weights only, no optimizer state."""
    file = Path(path)
    if file.is_dir():
        state = weights_of(open_checkpoint(find_checkpoint(file)))
    elif not file.is_file():
        raise FrzooError(f"{what} '{path}' does not exist.")
    else:
        state = _state_dict_file(file, path, what)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    if wrong:
        raise FrzooError(f"{what} '{path}' does not match the model: "
                         f"{len(wrong)} tensors have other shapes (file vs model), e.g. "
                         f"{'; '.join(wrong[:3])}.")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise FrzooError(
            f"{what} '{path}' does not match the model: "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]}).")


def _state_dict_file(file: Path, path: str, what: str) -> Dict[str, Any]:
    """A state_dict file, weights-only; a format-1 checkpoint (`last.pt`) gives its weights."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise FrzooError(f"{what} '{path}' could not be read as a weights-only "
                         f"checkpoint: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, dict) and state.get("format") == OLD_FORMAT and "parts" in state:
        state = export_from_checkpoint(state)
    if not isinstance(state, dict):
        raise FrzooError(f"{what} '{path}' holds a {type(state).__name__}, "
                         f"not a state_dict.")
    return state


def check_fits_data(model: nn.Module, *, num_classes: int, channels: int, image_size: int,
                    data_name: str) -> None:
    """Refuse, before anything trains, a model whose input channels or classes differ from the
    data's: otherwise the first step dies deep inside a convolution or cross_entropy.

    One eval-mode forward of a two-image batch of the data's shape decides: where it fails, the
    first convolution's input channels (the stem's, in most architectures) say whether the
    channels are the cause; where it runs, its output gives the classes. The first convolution
    alone is not enough: some stems rearrange the image before it (TResNet's space-to-depth
    gives its first convolution 48 channels for an RGB image).
    """
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))),
                 None)
    wanted = first.in_channels if isinstance(first, nn.Conv2d) else None
    sample = torch.zeros(2, channels, image_size, image_size)
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(sample)
    except RuntimeError as exc:
        if wanted is not None and wanted != channels:
            raise FrzooError(f"the model takes {wanted}-channel images but data '{data_name}' has "
                             f"{channels} channel(s); set model.kwargs.in_chans={channels} (or "
                             f"remove model.kwargs.in_chans: it defaults to the data's).") from exc
        raise
    finally:
        model.train(was_training)
    classes = out.shape[-1] if isinstance(out, torch.Tensor) and out.dim() == 2 else None
    if classes is not None and classes != num_classes:
        raise FrzooError(f"the model predicts {classes} classes but data '{data_name}' has "
                         f"{num_classes}; set model.kwargs.num_classes={num_classes} (or remove "
                         f"model.kwargs.num_classes: it defaults to the data's).")
