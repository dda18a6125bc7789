"""Teachers: which weights the objective's no-grad teacher passes run with (ALGORITHM.md §3.5).

One file per job:

* :mod:`.base`: the :class:`Teacher` interface and :class:`TeacherKind`, the one reading of
  ``ema_decay_rate`` (0 online, 1 frozen starting weights, else an EMA);
* :mod:`.dense`: a full copy of a plain module, frozen or a float32 EMA (small models, tests);
* :mod:`.zero3`: the frozen weights or the EMA kept as per-rank ZeRO-3 shards (the trainer, full models);
* :mod:`.adapter`: a peft ``ema`` adapter, or the base model with adapters disabled (LoRA runs);
* :mod:`.build`: which of them a run gets, from its kind and the model's layout.

Only :mod:`.base` is imported here: the others pull in the EMA kernel, DeepSpeed's layout or peft.
"""
from .base import OnlineTeacher, Teacher, TeacherKind

__all__ = ["OnlineTeacher", "Teacher", "TeacherKind"]
