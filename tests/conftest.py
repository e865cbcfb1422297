"""The local AWS-API server fixtures (moto on 127.0.0.1) and the native kernel module for every test;
shared data fixtures are in the repository's conftest.py."""
pytest_plugins = ["aws_fixtures", "native_fixtures"]
