"""What the plugin's tasks share: fixed-size fbank datasets with no dictionaries, loaded
without fairseq's prefetch thread when there are no workers."""
from fairseq.tasks import FairseqTask


class FbankTask(FairseqTask):
    """Base of ``mam_clap_pretraining``, ``mam_clap_finetuning`` and ``clap_teacher`` (not registered)."""

    def get_batch_iterator(self, dataset, **kwargs):
        """fairseq's batch iterator, without its prefetch thread when there are no workers.

        With ``dataset.num_workers=0`` fairseq's ``BufferedIterator`` thread would run this
        dataset's torch work (fbank, resampling) itself; a process that finishes while
        that thread is inside torch aborts at exit ("terminate called without an active
        exception"). Loading in the main thread avoids it; with workers nothing changes.
        """
        if kwargs.get("num_workers", 0) == 0:
            kwargs["data_buffer_size"] = 0
        return super().get_batch_iterator(dataset, **kwargs)

    def max_positions(self):
        return None

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None
