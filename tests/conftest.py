import pytest

from s3server import SeaweedS3


@pytest.fixture(scope="session")
def s3server(tmp_path_factory):
    """One real SeaweedFS S3 server for the session (see tests/s3server.py).

    A test that stops it must start it again before it ends (try/finally).
    """
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()
