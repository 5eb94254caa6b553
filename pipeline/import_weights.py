"""The authors' released weights, as ordinary checkpoints of this harness, scored under its protocol:

    python -m pipeline.import_weights --dataset ped2 --variant mnad-pred --weights model.pth --keys keys.pt --evaluate
    python -m pipeline.import_weights --dataset ped2 --variant memae --weights memae_ped2.pt --evaluate

MNAD (cvlab-yonsei/MNAD) saves its whole pickled network as model.pth and the memory items as keys.pt; MemAE
(donggong1/memae-anomaly-detection) saves a state dict (.pt). A MNAD state dict (`torch.save(model.state_dict())`)
is read too.

Reading runs no code from the files. A file in torch's zip format (PyTorch >= 1.6) goes through
`torch.load(weights_only=True)`, torch's restricted unpickler, which rebuilds tensors and plain containers only.
torch refuses any whole network in the older format, which is the one MNAD's model.pth was saved in (PyTorch 1.1), so
such files are read by Python's pure-Python unpickler held to the same rules (`_LegacyUnpickler`). Allowed besides
tensors: the torch.nn layers the two networks are made of, and the reference repositories' own classes (convAE,
Encoder, Decoder, Memory). Those classes are mapped to empty stand-in modules, so their code is never imported or
run; the one function a network pickled by older PyTorch (1.1 among them) calls,
torch.nn.backends.thnn._get_thnn_function_backend, is answered by a function that returns None. A file that names any other callable is refused, and nothing is
written.

Mapping: the reference state dict and this harness's network pair one to one, in registration order, with equal
shapes and the same leaf name (weight, bias, running_mean, ...). MNAD's `encoder.moduleBatchNorm` is dropped, since
its forward never uses it. MNAD's memory items come from keys.pt, MemAE's from `mem_rep.memory.weight`. The network
is the variant's at the dataset's profile (width, channels), so a released full-width colour MNAD goes onto a
dataset whose profile is the papers' (ped2, avenue, shanghaitech).

Output (default imported/<dataset>/<variant>/): checkpoint.pt holds {"model": the state dict, "imported": the
source files and their sha256, "config": the dataset, variant options and profile}, written atomically. It loads
with weights_only=True (`load_imported`). With --evaluate, the test set is scored as `pipeline.run` scores a
trained run: scores.csv, roc.csv and metrics.json beside the checkpoint, and one MLflow run named
`<variant>-released/seed0` in the dataset's experiment.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import pickle
import re
import struct
import tarfile
import types
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

from models.build import build_model
from pipeline import checkpoint, evaluate, tracking
from pipeline.config import REPO_ROOT, load_params
from pipeline.device import compute_device
from pipeline.download import sha256_of
from pipeline.errors import UserError, exit_cleanly
from pipeline.io import write_json
from pipeline.paths import frames_dir

IMPORTED_DIR = REPO_ROOT / "imported"

# The reference repositories' classes a pickled MNAD network names (model/ of cvlab-yonsei/MNAD).
REFERENCE_CLASSES = (
    "model.final_future_prediction_with_memory_spatial_sumonly_weight_ranking_top1.convAE",
    "model.final_future_prediction_with_memory_spatial_sumonly_weight_ranking_top1.Encoder",
    "model.final_future_prediction_with_memory_spatial_sumonly_weight_ranking_top1.Decoder",
    "model.memory_final_spatial_sumonly_weight_ranking_top1.Memory",
    "model.Reconstruction.convAE",
    "model.Reconstruction.Encoder",
    "model.Reconstruction.Decoder",
    "model.Memory.Memory",
)
# The torch.nn layers those networks are built from.
TORCH_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.Sequential, nn.Tanh)
MNAD_UNUSED = "moduleBatchNorm"          # in MNAD's encoder and state dict; its forward never uses it
MEMAE_MEMORY = "mem_rep.memory.weight"   # MemAE's memory items [N, C]
OUR_MEMORY = "memory.items"


# Older PyTorch (1.1 among them) kept a backend object in every module and pickled it as a call of this function;
# MNAD's model.pth was saved by PyTorch 1.1. The call is answered by `_no_backend`, so no torch code runs for it either.
LEGACY_BACKEND = "torch.nn.backends.thnn._get_thnn_function_backend"


class ReferenceModule(nn.Module):
    """Stands in for a reference repository's class: unpickling fills its attributes (submodules, parameters,
    plain settings) and nothing of the original class runs."""


def _no_backend() -> None:
    """What a legacy module's `_backend` becomes: nothing (today's torch.nn does not use it)."""


def _allowed_globals() -> list:
    stand_ins = [(type(name.rsplit(".", 1)[1], (ReferenceModule,), {"__module__": name.rsplit(".", 1)[0]}), name)
                 for name in REFERENCE_CLASSES]
    return [*stand_ins, (_no_backend, LEGACY_BACKEND), *TORCH_LAYERS]


def _refused(message: str) -> str | None:
    """What a file that torch's restricted unpickler refused tried to call or build, from the refusal's text;
    None when the unpickler failed on damaged bytes rather than on a forbidden name."""
    found = re.search(r"GLOBAL (\S+)", message)
    if found:
        return found.group(1)
    found = re.search(r"(?:call reduce for unrecognized function|allowlisted via `add_safe_globals`,? but got) (.+)",
                      message)
    return found.group(1).strip() if found else None


def read_file(path: Path, what: str):
    """A torch file through a restricted unpickler; any refusal or damage becomes one clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found; give the path of the file you downloaded")
    try:
        with open(path, "rb") as handle:
            zip_format = handle.read(4) == ZIP_MAGIC
        if not zip_format:
            return _load_legacy(path)
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = error.name if isinstance(error, Refused) else _refused(str(error))
        if refused is None:
            raise UserError(f"{what} {path} is not a readable torch file ({_first_line(error)}): truncated or "
                            f"corrupt; download it again") from None
        raise UserError(f"{what} {path} refused: it names {refused}, which is neither a tensor nor a layer of "
                        f"MNAD's or MemAE's networks. Nothing else is read, so that loading runs no code from the "
                        f"file; if you trust the file, load it in the authors' code, save its state_dict() and "
                        f"import that") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, struct.error, ValueError,
            IndexError, KeyError, AttributeError, TypeError, AssertionError) as error:
        # what damaged bytes raise in torch's readers and in the pure-Python unpickler
        raise UserError(f"{what} {path} is not a readable torch file ({_first_line(error)}): truncated or "
                        f"corrupt; download it again") from None


# --- the pre-1.6 file format ---
# torch's restricted unpickler refuses every network pickled in the format PyTorch wrote before 1.6 (MNAD's
# model.pth is one: PyTorch 1.1), since such a file names each network class in a persistent id
# ('module', class, source file, source), and torch admits storages only there. These files are read by the pure-Python
# unpickler instead, under the same rules as torch's: globals by exact name from the same allowlist, calls of
# allowlisted callables only, objects created and built of allowlisted classes only, containers filled only when
# they are plain containers, and in a persistent id nothing but a storage or an allowlisted class.

ZIP_MAGIC = b"PK\x03\x04"   # the format of PyTorch >= 1.6; anything else is the legacy format


class Refused(pickle.UnpicklingError):
    """A legacy pickle named, called or built something outside the allowlist; `name` says what."""

    def __init__(self, name: str):
        super().__init__(f"refused: {name}")
        self.name = name


class _LegacyUnpickler(pickle._Unpickler):
    allowed: dict[str, object] = {}   # full name -> object; set per file by _load_legacy

    def _check(self, obj, role: str) -> None:
        if not any(obj is value for value in self.allowed.values()):
            raise Refused(f"{getattr(obj, '__qualname__', type(obj).__qualname__)} (used as {role})")

    def find_class(self, module: str, name: str):
        if self.proto < 3 and self.fix_imports:   # Python 2's names, which protocol 2 writes (__builtin__.set)
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if f"{module}.{name}" not in self.allowed:
            raise Refused(f"{module}.{name}")
        return self.allowed[f"{module}.{name}"]

    def _reduce(self):
        self._check(self.stack[-2], "a function to call")
        pickle._Unpickler.load_reduce(self)

    def _newobj(self):
        self._check(self.stack[-2], "a class to create")
        pickle._Unpickler.load_newobj(self)

    def _newobj_ex(self):
        self._check(self.stack[-3], "a class to create")
        pickle._Unpickler.load_newobj_ex(self)

    def _build(self):
        kind = type(self.stack[-2])
        if kind not in (torch.Tensor, nn.Parameter, OrderedDict):
            self._check(kind, "a class to fill")
        pickle._Unpickler.load_build(self)

    def _binpersid(self):
        pid = self.stack[-1]
        kind = torch.serialization._maybe_decode_ascii(pid[0]) if isinstance(pid, tuple) and pid else None
        if kind == "module" and len(pid) > 1:
            self._check(pid[1], "a network class")
        elif kind != "storage":
            raise Refused(f"a persistent id {kind!r} (only storages and network classes are read)")
        pickle._Unpickler.load_binpersid(self)

    def _container(self, depth: int, kinds: tuple[type, ...]) -> None:
        if type(self.stack[depth]) not in kinds:
            raise Refused(f"{type(self.stack[depth]).__qualname__} (filled as a container)")

    def _append(self):
        self._container(-2, (list,))
        pickle._Unpickler.load_append(self)

    def _appends(self):
        items = self.pop_mark()
        self._container(-1, (list,))
        self.stack[-1].extend(items)

    def _setitem(self):
        self._container(-3, (dict, OrderedDict))
        pickle._Unpickler.load_setitem(self)

    def _setitems(self):
        items = self.pop_mark()
        self._container(-1, (dict, OrderedDict))
        for key, value in zip(items[::2], items[1::2]):
            self.stack[-1][key] = value

    def _additems(self):
        items = self.pop_mark()
        self._container(-1, (set,))
        self.stack[-1].update(items)

    def _unsupported(self):
        raise Refused("an opcode that imports or calls by another route (INST, OBJ, EXT, PERSID or buffers)")

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch.update({pickle.REDUCE[0]: _reduce, pickle.NEWOBJ[0]: _newobj, pickle.NEWOBJ_EX[0]: _newobj_ex,
                     pickle.BUILD[0]: _build, pickle.BINPERSID[0]: _binpersid, pickle.APPEND[0]: _append,
                     pickle.APPENDS[0]: _appends, pickle.SETITEM[0]: _setitem, pickle.SETITEMS[0]: _setitems,
                     pickle.ADDITEMS[0]: _additems})
    dispatch.update(dict.fromkeys([pickle.INST[0], pickle.OBJ[0], pickle.EXT1[0], pickle.EXT2[0], pickle.EXT4[0],
                                   pickle.PERSID[0], pickle.NEXT_BUFFER[0], pickle.READONLY_BUFFER[0]],
                                  _unsupported))


def _load_legacy(path: Path):
    """A legacy-format file, read by torch's own legacy reader (storages and their bytes) with _LegacyUnpickler
    for every pickle in it."""
    allowed = dict(torch._weights_only_unpickler._get_allowed_globals())   # tensors, storages, dtypes, OrderedDict
    for entry in _allowed_globals():
        value, name = entry if isinstance(entry, tuple) else (entry, f"{entry.__module__}.{entry.__qualname__}")
        allowed[name] = value
    unpickler = type("LegacyUnpickler", (_LegacyUnpickler,), {"allowed": allowed})
    reader = types.SimpleNamespace(Unpickler=unpickler,
                                   load=lambda handle, **options: unpickler(handle, **options).load())
    with open(path, "rb") as handle, warnings.catch_warnings():
        # The file's network classes are the stand-ins here, which have no source to compare with the saved one.
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
        return torch.serialization._legacy_load(handle, "cpu", reader, encoding="utf-8")


def _first_line(error: Exception) -> str:
    """The error's own first sentence; for torch's restricted unpickler, the one after its advice."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__


def reference_state(loaded, path: Path) -> dict[str, torch.Tensor]:
    """The state dict of what a weights file held: a pickled network or a state dict."""
    if isinstance(loaded, nn.Module):
        return dict(loaded.state_dict())
    if isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return dict(loaded)
    raise UserError(f"weights {path} hold a {type(loaded).__name__}, neither a network nor a state dict of "
                    f"tensors; give MNAD's model.pth or MemAE's .pt")


def map_state(reference: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], memory: torch.Tensor | None,
              source: Path, target: str) -> dict[str, torch.Tensor]:
    """Our state dict filled from the reference's: the memory from `memory`, every other entry from the
    reference's entry at the same position, which must have our shape and leaf name."""
    theirs = [key for key in reference if MNAD_UNUSED not in key and key != MEMAE_MEMORY]
    mine = [key for key in ours if key != OUR_MEMORY]
    if len(theirs) != len(mine):
        raise UserError(f"weights {source}: {len(theirs)} tensors where {target} has {len(mine)}: another network "
                        f"(a prediction model for a reconstruction variant, or the reverse?)")
    mapped = {}
    for their_key, our_key in zip(theirs, mine):
        their_shape, our_shape = tuple(reference[their_key].shape), tuple(ours[our_key].shape)
        if their_key.rsplit(".", 1)[-1] != our_key.rsplit(".", 1)[-1] or their_shape != our_shape:
            raise UserError(f"weights {source}: {their_key} {list(their_shape)} does not fit {our_key} "
                            f"{list(our_shape)} of {target}; the released networks are full width (profile width "
                            f"1.0), MNAD's in colour (channels 3), MemAE's in grey: import onto a dataset whose "
                            f"profile has those")
        mapped[our_key] = reference[their_key]
    if OUR_MEMORY in ours:
        if memory is None:
            raise UserError(f"{target} has a memory, and no items were given: pass MNAD's keys.pt with --keys")
        if tuple(memory.shape) != tuple(ours[OUR_MEMORY].shape):
            raise UserError(f"memory items {list(memory.shape)} do not fit {target}'s memory "
                            f"{list(ours[OUR_MEMORY].shape)}; set the variant's memory_items to the released "
                            f"memory's size")
        mapped[OUR_MEMORY] = memory
    return mapped


def import_weights(dataset_name: str, variant_name: str, weights: Path, keys: Path | None = None,
                   params_path: Path | None = None) -> tuple[nn.Module, dict]:
    """The variant's network at the dataset's profile, holding the released weights; and what was imported."""
    params = load_params(params_path)
    dataset, variant = params.dataset(dataset_name), params.variant(variant_name)
    if variant.family not in ("mnad", "memae"):
        raise UserError(f"variant {variant_name!r} is {variant.family}; released weights exist for mnad and memae "
                        f"variants")
    if keys is not None and variant.family == "memae":
        raise UserError("--keys is MNAD's keys.pt; MemAE's weights hold their memory")
    reference = reference_state(read_file(weights, "weights"), weights)
    memory = None
    if variant.family == "memae":
        memory = reference.get(MEMAE_MEMORY)
    elif keys is not None:
        memory = read_file(keys, "memory items")
        if not isinstance(memory, torch.Tensor):
            raise UserError(f"memory items {keys} hold a {type(memory).__name__}, not a tensor; give MNAD's keys.pt")
    model = build_model(variant, dataset.training_profile(variant))
    target = f"variant {variant_name} on {dataset_name}"
    model.load_state_dict(map_state(reference, model.state_dict(), memory, weights, target))
    sources = {"weights": str(weights), "weights_sha256": sha256_of(Path(weights))}
    if keys is not None:
        sources |= {"keys": str(keys), "keys_sha256": sha256_of(Path(keys))}
    return model.eval(), sources


def load_imported(path: Path, dataset_name: str, variant_name: str, params_path: Path | None = None) -> nn.Module:
    """The network of a checkpoint this module wrote, refused if it was imported for another variant or
    profile."""
    params = load_params(params_path)
    dataset, variant = params.dataset(dataset_name), params.variant(variant_name)
    state = checkpoint.load_checkpoint(path)
    expected = {"dataset": dataset_name, "variant": variant.training_options(),
                "profile": dataset.training_profile(variant).model_dump()}
    if "imported" not in state or state.get("config") != expected:
        raise UserError(f"{path} is not an import of {variant_name} on {dataset_name} at the current params; "
                        f"import the released weights again")
    model = build_model(variant, dataset.training_profile(variant))
    model.load_state_dict(state["model"])
    return model.eval()


def import_and_save(dataset_name: str, variant_name: str, weights: Path, keys: Path | None, out_dir: Path,
                    params_path: Path | None = None, score: bool = False, data_root: Path | None = None) -> dict:
    """Write out_dir/checkpoint.pt; with `score`, evaluate it and write scores.csv, roc.csv, metrics.json.
    Returns the metrics (empty without `score`)."""
    params = load_params(params_path)
    dataset, variant = params.dataset(dataset_name), params.variant(variant_name)
    model, sources = import_weights(dataset_name, variant_name, weights, keys, params_path)
    checkpoint.save_checkpoint(out_dir / "checkpoint.pt", {
        "model": model.state_dict(), "imported": sources,
        "config": {"dataset": dataset_name, "variant": variant.training_options(),
                   "profile": dataset.training_profile(variant).model_dump()}})
    print(f"imported {weights} into {out_dir / 'checkpoint.pt'}")
    if not score:
        return {}
    device = compute_device()
    with tracking.Run(dataset_name, f"{variant_name}-released", 0) as mlflow_run:
        mlflow_run.set_tags({**tracking.environment_tags(device.type), "imported": "true"})
        mlflow_run.log_params({f"imported.{key}": value for key, value in sources.items()})
        metrics = evaluate.evaluate(model.to(device), variant, 0, frames_dir(dataset_name, data_root), out_dir,
                                    params.evaluate, dataset.profile.update_threshold, device)
        metrics["imported"] = sources
        write_json(out_dir / "metrics.json", metrics)
        headline = metrics[metrics["headline"]]
        mlflow_run.log_metrics({**tracking.flatten(metrics, "eval."),
                                **{key: headline.get(key) for key in ("auc_micro", "auc_macro", "mean_psnr")}})
        for name in ("scores.csv", "roc.csv", "metrics.json"):
            mlflow_run.log_artifact(out_dir / name)
        mlflow_run.finish()
    print(f"{dataset_name} {variant_name} (released weights): {metrics['headline']} micro AUC "
          f"{headline['auc_micro']:.4f}")
    return metrics


@exit_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a dataset of params.yaml (its profile sets the network)")
    parser.add_argument("--variant", required=True, help="e.g. mnad-pred, mnad-recon, memae")
    parser.add_argument("--weights", type=Path, required=True, help="MNAD's model.pth or MemAE's .pt")
    parser.add_argument("--keys", type=Path, help="MNAD's keys.pt (the memory items)")
    parser.add_argument("--out", type=Path, help="output folder (default imported/<dataset>/<variant>)")
    parser.add_argument("--evaluate", action="store_true", help="score the test set (the dataset's frames)")
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repository's)")
    args = parser.parse_args(argv)
    out_dir = args.out or IMPORTED_DIR / args.dataset / args.variant
    import_and_save(args.dataset, args.variant, args.weights, args.keys, out_dir, args.params, args.evaluate)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
