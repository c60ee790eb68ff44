"""The task interface: everything the generic lifecycle (training loop, evaluation, doctor, export) needs to
know about a problem, and nothing else. A task implements it in its own module (docs/your-task.md in the
baked project says how).

The config selects the task: `configs/task/<name>.yaml` holds `_target_: <package>.<module>.<Class>` and
`configs/config.yaml` lists `- task: <name>` in its defaults. `load_task(cfg)` builds it.

Conventions: a dataset item is a dict of tensors (and plain numbers/strings); `input_key` names the network's
input in it. The network maps a batch of inputs to a tensor or a dict of tensors; the loss maps
(output, batch) to (scalar loss, {term name: 0-dim tensor}) — the terms are the loss's named parts, logged
as `train/<term>` and checked one by one by the doctor.
"""

import importlib


class TaskError(ValueError):
    """The task config is missing or wrong; the message says what to write."""


class Task:
    """Subclass and implement the methods that raise NotImplementedError; the others have working defaults."""

    #: the network's input in a batch dict
    input_key = "image"

    def __init__(self, cfg):
        self.cfg = cfg

    # --- training ----------------------------------------------------------------------------------------------

    def build_datasets(self, cfg):
        """(train_set, val_set): torch Datasets of dict items."""
        raise NotImplementedError

    def build_loss(self, cfg, train_set):
        """criterion(out, batch) -> (loss, {term: value}); called after build_datasets, before build_model.
        Optional: criterion.per_sample(out, batch) -> (losses [B], {term: [B]}), the same per sample in one
        call (the doctor scores each validation sample; without it, one criterion call per sample)."""
        raise NotImplementedError

    def build_model(self, cfg):
        """A fresh nn.Module: model(batch[input_key]) -> output (tensor or dict of tensors)."""
        raise NotImplementedError

    def train_transform(self, cfg):
        """An augmentation applied to each collated training batch (batch -> batch), or None. It draws from
        torch's, numpy's or Python's global generators, which the loader seeds per batch (loaders.py): a
        resumed run repeats its random numbers with any number of workers. Change the labels here too when an
        augmentation changes what they describe: the doctor trains a run that learns nothing without it, to
        test that label update (debugging/fixes.py, the augmentation row)."""
        return None

    def val_errors(self, model, out, batch):
        """{name: per-sample error tensor [B]} on a validation batch, lower is better; training logs each
        median as `val/<name>_median` (`training.select_metric` picks one to keep best.pt by)."""
        return {}

    def preview(self, model, batch):
        """A uint8 3xHxW image of predictions on a validation batch for the tracker, or None."""
        return None

    # --- faults injected on purpose (to test the doctor), none by default ------------------------------------

    def fault_datasets(self, cfg, train_set, val_set):
        return train_set, val_set

    def fault_batch(self, cfg):
        """A function on collated batches that breaks them (after augmentation), or None."""
        return None

    def fault_model(self, cfg, model):
        return model

    def fault_of(self, cfg):
        """The name of the injected fault, or None."""
        return None

    # --- the doctor --------------------------------------------------------------------------------------------

    def draw_labels(self, batch):
        """A batch's labels drawn as inputs (a tensor shaped like batch[input_key]), or None (the default: no
        such check). The doctor puts this drawing through `train_transform` in place of the images and
        compares it with the drawing of the labels that come out: an augmentation whose label update
        disagrees with what it does to the image is an implementation bug. Draw what the labels say about
        the image, smoothly (blobs, not 1-pixel lines), so an image warp's interpolation keeps it."""
        return None

    def target(self, batch):
        """The targets of a batch as [B, k] floats: what the doctor's order and shortcut probes correlate."""
        raise NotImplementedError

    # --- error analysis and metric review: they read errors.csv, never the model ----------------------------

    #: errors.csv columns that together identify a sample (default: an `id` or `sample_id` column, else the row)
    sample_id_columns = ()
    #: errors.csv column holding each sample's image path: the contact sheet shows those images
    image_column = "image_path"
    #: appended to the contact sheet's note: what `draw_error` drew
    contact_sheet_legend = ""
    #: the columns copied into the tag sheet (None: every column except `tag_*`)
    sheet_columns = None
    #: errors.csv columns whose median each slice of the metric review reports
    slice_medians = ()

    def error_columns(self, table):
        """Add derived per-sample columns to the errors table (`table.set_column(name, values)`)."""

    def error_tags(self, table, thresholds):
        """{category: bool array over the rows}: automatic tags beside the `tag_<category>` columns
        (`thresholds`: debugging.error_analysis.tags)."""
        return {}

    def error_slices(self, table):
        """{family: (label per row, labels in order)}: slices of the headline beside the `slice_<name>` columns."""
        return {}

    def draw_error(self, image, table, i, scale):
        """Sample i's contact-sheet thumbnail (uint8 3xHxW, its image resized by scale = (sx, sy)), annotated."""
        return image

    # --- evaluation and deployment -----------------------------------------------------------------------------

    def inference_model(self, net, cfg):
        """The module evaluation runs and export writes (default: the trained network itself)."""
        return net

    def evaluate(self, cfg, trained_cfg, model, device, out_dir):
        """Run `model` on the test split. Returns (metrics, rows): metrics a flat dict of floats (written to
        metrics.json), rows one dict per test sample (written to errors.csv, the columns of the first row);
        may write more (plots, predictions) into out_dir."""
        raise NotImplementedError


def configured_task(cfg):
    """The configured task, or the base Task (its defaults) when the config selects none: error analysis and
    metric review run on any errors.csv."""
    return load_task(cfg) if cfg.get("task") is not None else Task(cfg)


def load_task(cfg):
    """The Task the config selects (`task._target_`)."""
    spec = cfg.get("task")
    if spec is None or not spec.get("_target_"):
        raise TaskError(
            "no task configured: write configs/task/<name>.yaml with `_target_: <package>.<module>.<Class>` "
            "and select it in configs/config.yaml (`- task: <name>`); see docs/your-task.md"
        )
    module_name, _, class_name = str(spec._target_).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise TaskError(f"task._target_={spec._target_} cannot be imported ({error})") from error
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskError(f"task._target_={spec._target_} is not a subclass of task.Task")
    return cls(cfg)
