"""The provider, adapter, contract and crash suites again, with result files
in a bucket of moto's S3-protocol server (HOLDFAST_FILES=s3://...): what
they check of files on disk must hold of objects too.

The tests are the suites' own, not copies: the classes are subclassed and
the functions imported, and pytest runs them here with this module's
fixtures, `files` (a bucket of the test's own, see tests/test_objects.py)
and `result_files` (the crash suite's servers pointed at a bucket).
tests/test_objects.py already runs test_providers' TestComfyUI, TestKIE and
TestDownloads this way. Left out, since they never save, read or remove a
result file: test_providers' configuration tests and take_slot race;
test_adapters' tests whose job fails, is cancelled or is in doubt, and its
configuration tests; the contract suite's adapter-level tests (they call an
adapter, never a file store).
"""

import pytest

import test_providers
from test_adapters import (  # noqa: F401 (run here, on a bucket)
    spec, test_a_429_is_sent_again_only_after_its_retry_after, test_a_job_succeeds_with_its_files_saved,
    test_a_refused_poll_waits_its_retry_after_and_never_submits_again, test_kie_answers_read_the_same_by_both,
    test_on_doubt_resubmit_sends_it_again, test_replicate_outputs_of_every_shape_are_saved,
    test_runpod_a_base64_image_over_max_file_bytes_fails_invalid_result, test_runpod_base64_images_become_files)
from test_crash import (  # noqa: F401 (run here, on a bucket)
    LocalFiles, test_crash_suite_random_kills, test_kill_9_mid_run_loses_and_repeats_nothing)
from test_objects import bucket, files, keys, object_store, uploads  # noqa: F401 (fixtures)
from test_providers import (  # noqa: F401 (run here, on a bucket)
    comfy, test_concurrency_2_keeps_at_most_2_jobs_at_the_provider_under_20_submissions,
    test_get_providers_lists_limits_and_last_seen_health)
from test_providers_contract import (  # noqa: F401 (run here, on a bucket)
    any_harness, test_through_the_worker_a_failing_job_ends_provider_rejected,
    test_through_the_worker_a_job_ends_succeeded_with_its_files)


class TestLocalOnS3(test_providers.TestLocal):
    pass


class BucketFiles(LocalFiles):
    """The crash suite's servers keep their files in `bucket`."""

    kill_rounds = 2
    # A round on a bucket takes twice as long as on disk (every file is a
    # few requests to moto): 4 rounds instead of 10, over the same range
    # of kill moments (test_crash_suite_random_kills gives each its slice).
    random_rounds = 4

    def __init__(self, moto_server, bucket):
        self.moto_server, self.bucket = moto_server, bucket

    def env(self):
        return self.moto_server.env(self.bucket)

    def store(self, data_dir):
        # Nothing may go to the data directory's disk instead.
        assert not (data_dir / "files").exists(), "a server wrote result files to its disk"
        return object_store(self.moto_server, self.bucket)

    def stored(self, data_dir):
        # The whole bucket: a key outside the prefix belongs to no task.
        return {tuple(key.split("/", 2)[1:]) if key.startswith("files/") else ("outside files/", key)
                for key in keys(self.moto_server, self.bucket, prefix="")}

    def partial(self, data_dir):
        return uploads(self.moto_server, self.bucket)


@pytest.fixture
def result_files(moto_server, bucket):
    return BucketFiles(moto_server, bucket)
