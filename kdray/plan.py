"""Expand a sweep into trial specs: teachers (stage 1) and students (stage 2).

Tune's cartesian grid cannot say that SIDDO ignores alpha, so kdray expands
the grid itself and de-duplicates by trial key.  Seeds follow docs/protocol.md §2:
teacher seed s fixes the teacher's init and data order; student seed fixes a
student's data order; students of a self-distillation setup start from the
teacher's initial weights, students of a different architecture from their
own student seed (shared by every condition with that seed).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from kdray import conditions, packplan
from kdray.packplan import Packing
from kdray.spec import TrialSpec
from kdray.sweep import Setup, Sweep, enabled_conditions


@dataclass
class Plan:
    sweep: Sweep
    teachers: list[TrialSpec] = field(default_factory=list)
    students: list[TrialSpec] = field(default_factory=list)
    _packing: tuple = field(default=(), repr=False, compare=False)   # (student keys, Packing)

    @property
    def all(self) -> list[TrialSpec]:
        return self.teachers + self.students

    def counts(self) -> dict[tuple[str, str], int]:
        """(setup, method) -> number of trials."""
        return dict(Counter((s.setup, s.method) for s in self.all))

    def gpu_hours(self) -> float:
        """The GPU-hours the sweep file's ``gpu_hours_per_model`` estimates for the setups that use GPUs."""
        counts = Counter(s.setup for s in self.all)
        return sum(st.gpu_hours_per_model * counts[st.name] for st in self.sweep.setups if _on_gpu(st))

    def packing(self) -> Packing:
        """The students' Tune trials: packs cut from every planned student (never from what is left
        to run), one trial per other student, and why those that asked to pack cannot
        (kdray/packplan.py: from the declarations, torch-free; a plug-in model or data set that
        declares nothing is built or loaded to look, once per plan)."""
        keys = tuple(s.trial_key for s in self.students)
        if not self._packing or self._packing[0] != keys:
            self._packing = (keys, packplan.packing(self.students))
        return self._packing[1]

    def n_pairs(self) -> int:
        """The fewest paired student seeds of any setup (what the tests will see)."""
        return min(len(s.student_seeds) for s in self.sweep.setups)


def student_conditions(setup: Setup) -> list[dict]:
    """The (method, params) a student seed is trained under, in the conditions' declared order."""
    out = []
    for cond, config in enabled_conditions(setup.conditions):
        for method, params in cond.grid(config):
            out.append(dict(method=method, params=conditions.get(method).full_params(params)))
    return out


def _self_distillation(setup: Setup, width: float) -> bool:
    if setup.teacher.checkpoint is not None:   # its initial weights are not known
        return False
    same = setup.student is None or (setup.student.arch, setup.student.args) == (setup.teacher.arch, setup.teacher.args)
    return same and width == 1.0


def _pretrained(setup: Setup) -> dict:
    """A checkpoint teacher's fields: where the weights are, their SHA-256, and no training."""
    ckpt = setup.teacher.checkpoint
    if ckpt is None:
        return {}
    from kdray import checkpoints
    return dict(checkpoint=checkpoints.locate(ckpt), checkpoint_sha256=checkpoints.sha256(ckpt))


def expand_setup(sweep: Sweep, setup: Setup) -> tuple[list[TrialSpec], list[TrialSpec]]:
    common = dict(setup=setup.name, dataset=setup.dataset.name, data_root=sweep.data_root, sweep=sweep.name,
                  plugins=tuple(sweep.plugins),
                  evals=tuple(setup.evals),
                  distributed=setup.distributed.model_dump() if setup.distributed else {})
    recipe = setup.recipe.model_dump()
    student_recipe = {**recipe, **setup.student_recipe}
    teachers, students = [], []
    pretrained = _pretrained(setup)
    teacher_recipe = {**recipe, **setup.teacher_recipe, **({"train": False} if pretrained else {})}
    for ts in setup.teacher_seeds:
        teacher = TrialSpec(role="teacher", method="teacher", arch=setup.teacher.arch,
                            arch_args=dict(setup.teacher.args), teacher_seed=ts, init_seed=ts, data_seed=ts,
                            dataset_args={**setup.dataset.args, **setup.teacher_dataset},
                            recipe=teacher_recipe, resources=setup.resources.teacher.model_dump(),
                            **pretrained, **common)
        teachers.append(teacher)
        for width in setup.widths:
            arch_args = dict(setup.student_model.args)
            if width != 1.0:
                arch_args["width"] = width
            from_teacher = {"auto": _self_distillation(setup, width), "teacher": True,
                            "student_seed": False}[setup.student_init]
            for ss in setup.student_seeds:
                for cond in student_conditions(setup):
                    students.append(TrialSpec(
                        role="student", arch=setup.student_model.arch, arch_args=arch_args,
                        teacher_seed=ts, student_seed=ss, init_seed=ts if from_teacher else ss, data_seed=ss,
                        width=width, dataset_args=dict(setup.dataset.args), recipe=student_recipe,
                        teacher=teacher, resources=setup.resources.student.model_dump(), **cond, **common))
    return teachers, students


def build_plan(sweep: Sweep) -> Plan:
    plan = Plan(sweep)
    seen: set[str] = set()
    for setup in sweep.setups:
        teachers, students = expand_setup(sweep, setup)
        for spec in teachers:
            if spec.trial_key not in seen:
                seen.add(spec.trial_key)
                plan.teachers.append(spec)
        for spec in students:
            if spec.trial_key not in seen:
                seen.add(spec.trial_key)
                plan.students.append(spec)
    return plan


def format_plan(plan: Plan) -> str:
    """The counts per setup, stage and method, as ``kdray plan`` prints them."""
    lines = [f"sweep {plan.sweep.name}: {len(plan.all)} trials "
             f"({len(plan.teachers)} teachers in stage 1, {len(plan.students)} students in stage 2)"]
    counts = plan.counts()
    for setup in plan.sweep.setups:
        per = {m: n for (s, m), n in counts.items() if s == setup.name}
        total = sum(per.values())
        detail = ", ".join(f"{m} {n}" for m, n in sorted(per.items(), key=lambda kv: _order(kv[0])))
        lines.append(f"  {setup.name}: {total} models ({detail})")
        lines.append("    " + _estimate(setup, per))
        if setup.resources.student.pack > 1:
            lines.append(f"    students packed up to {setup.resources.student.pack} per trial (one process, "
                         f"stacked under torch.func.vmap)")
            lines += ["    " + line for line in _pack_lines(plan, setup.name)]
    return "\n".join(lines)


def _pack_lines(plan: Plan, setup: str) -> list[str]:
    """How the setup's students are cut into packs, and why those that asked to pack cannot."""
    packing = plan.packing()
    packs = [j for j in packing.jobs if len(j) > 1 and j[0].setup == setup]
    sizes = sorted({len(j) for j in packs})
    size = "" if not sizes else f" of {sizes[0]}" if len(sizes) == 1 else f" of {sizes[0]}-{sizes[-1]}"
    alone = sum(1 for j in packing.jobs if len(j) == 1 and j[0].setup == setup and j[0].role == "student")
    out = [f"packs: {sum(map(len, packs))} students in {len(packs)} packs{size}; {alone} one per trial"]
    why: dict[str, int] = {}
    for s in plan.students:
        if s.setup == setup and s.trial_key in packing.reasons:
            why[packing.reasons[s.trial_key]] = why.get(packing.reasons[s.trial_key], 0) + 1
    out += [f"not packed: {n} students: {w}" for w, n in why.items()]
    return out


def _on_gpu(setup) -> bool:
    return bool(setup.resources.teacher.gpu or setup.resources.student.gpu
                or (setup.distributed and setup.distributed.use_gpu))


def _estimate(setup, per: dict[str, int]) -> str:
    """GPU-hours at the setup's per-model cost, and how trials pack onto GPUs."""
    if not _on_gpu(setup):
        return "runs on CPU (no GPU estimate)"
    hours = setup.gpu_hours_per_model * sum(per.values())
    parts = [f"~{hours:,.0f} GPU-hours at {setup.gpu_hours_per_model:g} per model"]
    for stage in ("teacher", "student"):
        gpu = getattr(setup.resources, stage).gpu
        workers = setup.distributed.workers if setup.distributed else 1
        if gpu == 0 and not (setup.distributed and setup.distributed.use_gpu):
            parts.append(f"{stage}s on CPU")
        elif setup.distributed:
            parts.append(f"{stage}s: {workers} GPU workers per trial")
        else:
            parts.append(f"{stage}s: {max(1, int(1 / gpu + 1e-9))} per GPU")
    return "; ".join(parts)


def _order(method: str) -> int:
    cond = conditions.find(method)
    return 0 if cond is None else cond.order
