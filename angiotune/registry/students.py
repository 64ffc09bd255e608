"""Distilled students in the registry, each beside its teacher: ``best/<KEY>.student.json``.

A student entry has the registry's layout (a versioned folder named by a pointer, checksums,
a card) with the student's Hugging Face folder in ``student/``. Its manifest names the teacher
entry it learned from (``teacher_entry``), its validation and test Dice beside the teacher's,
their agreement, and FLOPs per lesion. A student replaces another of the same teacher only by
scoring better; a student of a newer teacher replaces one of an older teacher outright, and a
student whose teacher has since been replaced is reported as stale, not silently used.
"""

from __future__ import annotations

from pathlib import Path

from angiotune.names import GENERAL
from angiotune.registry.store import PAYLOADS, RegistryError, entry_dir, promote, read_entry

STUDENT = PAYLOADS[1]


def student_key(vessel: str) -> str:
    return f"{vessel}.{STUDENT}"


def promote_student(results: Path, vessel: str, student: Path, record: dict
                    ) -> tuple[bool, str]:
    """Keep ``student`` for ``vessel`` if it beats the student kept for the same teacher on
    validation Dice; it replaces a stale one (whose teacher has been replaced) outright. A
    student of a teacher that is no longer the kept one is refused."""
    teacher = entry_dir(Path(results), vessel)
    if teacher is None or teacher.name != record["teacher_entry"]:
        return False, (f"{vessel}: the student was not kept: its teacher "
                       f"{record['teacher_entry']} is no longer the kept {vessel} model; run "
                       "`angiotune distill` again")

    def stale(current: dict) -> bool:
        return current.get("teacher_entry") != record["teacher_entry"]

    return promote(results, student_key(vessel), student,
                   {**record, "payload": STUDENT, "teacher_vessel": vessel},
                   supersedes=stale, card=student_card, what="student")


def read_student(results: Path, vessel: str) -> dict | None:
    """A vessel's student manifest with ``path`` and ``stale`` (its teacher is no longer the
    kept one); None when no student is kept."""
    entry = read_entry(Path(results), student_key(vessel))
    if entry is None:
        return None
    if entry.get("payload") != STUDENT:
        raise RegistryError(f"{entry['path']}: not a student entry (edited?); run `angiotune "
                            "distill` again")
    teacher = entry_dir(Path(results), vessel)
    entry["stale"] = teacher is None or teacher.name != entry["teacher_entry"]
    return entry


def load_kept_student(results: Path, vessel: str):
    """The vessel's student, ready to segment (``LesionModel``); refused when none is kept or
    its teacher has been replaced since (distil again)."""
    from angiotune.model.student import load_student

    entry = read_student(results, vessel)
    if entry is None:
        raise RegistryError(f"no student kept for {vessel} in {Path(results) / 'best'}; run "
                            "`angiotune distill` first")
    if entry["stale"]:
        raise RegistryError(f"the {vessel} student learned from a teacher that has since been "
                            "replaced; run `angiotune distill` again")
    return load_student(Path(entry["path"]) / STUDENT)


def student_card(manifest: dict) -> str:
    validation, test = manifest.get("validation", {}), manifest.get("test", {})
    encoder, teacher = manifest.get("encoder", {}), manifest.get("teacher_encoder", {})
    ms = manifest.get("ms_per_lesion_rtx3090", {})
    scope = ("every vessel (general)" if manifest.get("teacher_vessel") == GENERAL
             else manifest.get("teacher_vessel"))

    def value(scores: dict, key: str) -> str:
        return f"{scores[key]:.4f}" if key in scores else "n/a"

    return f"""# angiotune distilled student: {scope} lesion segmentation

- Task: segment the analysed coronary segment inside a box prompt (SAM 3 tracker architecture,
  a smaller image encoder); no measurement heads: QCA reads its mask.
- Teacher: registry entry {manifest.get('teacher_entry')} (validation score
  {manifest.get('teacher_score', float('nan')):.4f})
- Encoder: {encoder.get('blocks')} blocks x {encoder.get('hidden_size')} wide at
  {encoder.get('image_size')} px (teacher: {teacher.get('blocks')} x
  {teacher.get('hidden_size')} at {teacher.get('image_size')} px)
- Validation Dice {value(validation, 'dice')} (teacher {value(validation, 'teacher_dice')}),
  agreement with the teacher {value(validation, 'agreement')}
- Test Dice {value(test, 'dice')} (teacher {value(test, 'teacher_dice')}), agreement
  {value(test, 'agreement')}
- Per lesion on an RTX 3090: about {ms.get('student')} ms (teacher {ms.get('teacher')} ms),
  {manifest.get('ms_assumption')}
- Data: {manifest.get('data_note')}
- Search: {manifest.get('search')}, trial {manifest.get('trial_id')}, epoch {manifest.get('epoch')}

Scores on phantoms test the software; they are not clinical results.
"""
