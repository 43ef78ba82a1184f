"""Where the evaluation model and the kernels run: the compute device (--device, one GPU per rank under
torchrun), an optional --device-map spreading the evaluation model over devices (checked: devices that exist,
modules that exist, tied weights kept together), and the check that --backend runs on every such device.
"""

from __future__ import annotations

import json

import torch

from evolver_kernels.distributed import Ranks
from evolver_kernels.evolve.config import ConfigError
from evolver_kernels.io import model_io
from evolver_kernels.kernels import backends
from evolver_kernels.storage.arena import Arena, Layout


class Placement:
    """The compute device and, with a device map, which device holds each module of the evaluation model."""

    def __init__(
        self, device: str | None, device_map: str | None, ranks: Ranks, model: torch.nn.Module, layout: Layout
    ):
        self.layout = layout
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: torch sees no CUDA GPU")
        self.device = ranks.device(self.device)
        self.device_map = self._parse_map(device_map, model, layout) if device_map else None
        if self.device_map is not None:
            if ranks.enabled:
                raise ConfigError("--device-map and several ranks cannot be combined (one evaluation model per run)")
            cuda = [d for d in self.device_map.values() if d.startswith("cuda")]
            self.device = torch.device(cuda[0] if cuda else "cpu")  # inputs, chunk buffers, the pipeline's device

    @property
    def placed(self) -> bool:
        """The evaluation model is cut into segments on several devices (a map with more than one entry)."""
        return self.device_map is not None and len(self.device_map) > 1

    def check_backend(self, backend: str | None) -> None:
        """--backend must run on every device the kernels will: the compute device and, with --device-map,
        each device that holds a part of the evaluation model."""
        if backend is None:
            return
        devices = {str(self.device)} | set(self.device_map.values() if self.device_map else ())
        for device in sorted(devices):
            reason = backends.unavailable_reason(backend, device)
            if reason is not None:
                where = (
                    " (--device-map places modules there)"
                    if self.device_map and device in self.device_map.values()
                    else ""
                )
                raise ConfigError(
                    f"--backend {backend} cannot run on {device}{where}: {reason}; "
                    "leave --backend unset to use the fastest backend of each device"
                )

    def arena(self) -> Arena:
        """An empty arena for a whole model on the compute side: on the compute device, or placed by the map."""
        if not self.placed:
            return Arena.empty(self.layout, self.device)

        def place(entry):
            key = model_io.device_for(entry.name, self.device_map)
            return key, torch.device(self.device_map[key])

        return Arena.placed(self.layout, place)

    def bind(self, model: torch.nn.Module, arena: Arena, files: list[str]) -> None:
        """Makes the empty evaluation model evaluate `arena` (its parameters become views into it)."""
        if arena.is_placed:
            model_io.place_model(model, arena, files, self.device_map, self.device)
        else:
            model_io.attach_arena(model, arena, files, self.device)

    def device_bytes(self) -> dict[str, int]:
        """Bytes of one model copy per device: on the compute device, or as the map places it."""
        if not self.placed:
            return {"cpu" if self.device.type == "cpu" else str(self.device): self.layout.nbytes}
        per_device: dict[str, int] = {}
        for e in self.layout.entries:
            device = self.device_map[model_io.device_for(e.name, self.device_map)]
            per_device[device] = per_device.get(device, 0) + e.numel * self.layout.group_dtype(e.group).itemsize
        return per_device

    def devices(self) -> list[str]:
        """Every device the kernels run on: the compute device and, with a map, each device it places on."""
        return list(dict.fromkeys([str(self.device), *(self.device_map.values() if self.device_map else ())]))

    def describe(self) -> str:
        if not self.placed:
            return str(self.device)
        from evolver_kernels.io.rundir import format_bytes

        return (
            "several devices (--device-map: "
            + ", ".join(f"{d} {format_bytes(b)}" for d, b in self.device_bytes().items())
            + ")"
        )

    def _parse_map(self, spec: str, model: torch.nn.Module, layout: Layout) -> dict[str, str]:
        """--device-map as {module name: device}, checked: devices that exist, tied weights kept together."""
        if spec == "auto":
            from accelerate import infer_auto_device_map

            raw = infer_auto_device_map(
                model, no_split_module_classes=sorted(getattr(model, "_no_split_modules", None) or [])
            )
        else:
            try:
                with open(spec) as f:
                    raw = json.load(f)
            except (OSError, json.JSONDecodeError) as err:
                raise ConfigError(f"--device-map {spec}: not a readable JSON object ({err})") from err
            if not isinstance(raw, dict) or not raw:
                raise ConfigError(f"--device-map {spec}: must be a non-empty JSON object {{module name: device}}")
        device_map = {}
        for key, device in raw.items():
            device = f"cuda:{device}" if isinstance(device, int) else str(device)
            if device == "cuda":
                device = "cuda:0"
            if device != "cpu" and not device.startswith("cuda:"):
                raise ConfigError(
                    f"--device-map: {key!r} on {device!r}; devices are cpu, cuda:N or a GPU index "
                    "(disk offload is not supported: use --population-on disk for the population)"
                )
            if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
                raise ConfigError(
                    f"--device-map: {key!r} on {device}, but torch sees {torch.cuda.device_count()} GPU(s)"
                )
            if key:
                try:
                    model.get_submodule(key)
                except AttributeError as err:
                    raise ConfigError(f"--device-map: the model has no module {key!r}") from err
            device_map[key] = device
        for e in layout.entries:
            devices = {device_map[model_io.device_for(alias, device_map)] for alias in e.aliases}
            if len(devices) > 1:
                raise ConfigError(
                    f"--device-map puts the tied weights {', '.join(e.aliases)} on {sorted(devices)}: "
                    "tied weights must share a device"
                )
        return device_map
