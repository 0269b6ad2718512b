"""The workflow stage graph: which tools a session may use, and where it may go next.

`stages` maps each stage to its tools; the first stage is where a session
starts. `transitions` maps each stage to the stages it may move to (`[]` is a
terminal stage). Without `transitions`, every stage may move to every other.
A tool in no stage is usable in every stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from concierge.errors import ConfigurationError

__all__ = ["StageGraph"]


class StageGraph:
    """A validated, immutable view of `app.stages` and `app.transitions`."""

    def __init__(
        self,
        stages: Mapping[str, Sequence[str]],
        transitions: Mapping[str, Sequence[str]] | None,
    ) -> None:
        self.stages: dict[str, tuple[str, ...]] = {s: tuple(tools) for s, tools in stages.items()}
        names = list(self.stages)
        if transitions is None:
            self.transitions = {s: tuple(t for t in names if t != s) for s in names}
        else:
            self.transitions = {s: tuple(transitions.get(s, ())) for s in names}
            self._raw_transitions = dict(transitions)
        self.start: str | None = names[0] if names else None
        self._stages_of: dict[str, list[str]] = {}
        for stage, tools in self.stages.items():
            for tool in tools:
                self._stages_of.setdefault(tool, []).append(stage)

    def __bool__(self) -> bool:
        return bool(self.stages)

    def validate(self, tool_names: Iterable[str]) -> None:
        """Check the graph against the registered tools.

        Raises:
            ConfigurationError: a stage names an unknown tool, a transition names
                an unknown stage, or a stage cannot be reached from the start.
        """
        known = set(tool_names)
        for stage, tools in self.stages.items():
            if not isinstance(stage, str) or not stage:
                raise ConfigurationError(f"stage names must be non-empty strings, got {stage!r}")
            for tool in tools:
                if tool not in known:
                    raise ConfigurationError(
                        f"stage {stage!r} lists tool {tool!r}, which is not registered; "
                        f"registered tools: {sorted(known)}"
                    )
        for source, targets in getattr(self, "_raw_transitions", {}).items():
            if source not in self.stages:
                raise ConfigurationError(
                    f"transitions name stage {source!r}, which is not in app.stages {list(self.stages)}"
                )
            for target in targets:
                if target not in self.stages:
                    raise ConfigurationError(
                        f"transition {source!r} -> {target!r} names unknown stage {target!r}; "
                        f"stages: {list(self.stages)}"
                    )
        if self.start is None:
            return
        seen = {self.start}
        frontier = [self.start]
        while frontier:
            for target in self.transitions[frontier.pop()]:
                if target not in seen:
                    seen.add(target)
                    frontier.append(target)
        unreachable = [s for s in self.stages if s not in seen]
        if unreachable:
            raise ConfigurationError(
                f"stage {unreachable[0]!r} cannot be reached from the start stage {self.start!r} "
                "through app.transitions"
            )

    def current(self, stored: str | None) -> str | None:
        """The session's stage: the stored one, or the start for a new session."""
        if stored is not None and stored in self.stages:
            return stored
        return self.start

    def stages_of(self, tool: str) -> list[str]:
        """The stages that list `tool` (empty: usable in every stage)."""
        return self._stages_of.get(tool, [])

    def allows(self, stage: str | None, tool: str) -> bool:
        """Whether `tool` may be called in `stage`."""
        homes = self._stages_of.get(tool)
        return not homes or stage in homes

    def tools_in(self, stage: str | None) -> list[str]:
        return list(self.stages.get(stage or "", ()))

    def targets(self, stage: str | None) -> list[str]:
        return list(self.transitions.get(stage or "", ()))
