"""Clients for the tests: in memory, and on the DynamoDB Local that CI starts
(``CMZ_TEST_DYNAMODB_URL``), each DynamoDB client on tables of its own."""

import os
import secrets

import pytest

import cmz

JWT_SECRET = "python-test-secret-0123456789abcdef-0123"
TABLE_VARIABLES = [
    "CONVERSATION_DYNAMO_TABLE_NAME",
    "CONVERSATION_SESSION_TABLE_NAME",
    "CONVERSATION_MESSAGE_TABLE_NAME",
    "USER_DYNAMO_TABLE_NAME",
    "FAMILY_DYNAMO_TABLE_NAME",
    "ANIMAL_DYNAMO_TABLE_NAME",
    "CMZ_META_TABLE_NAME",
    "CMZ_CARE_TABLE_NAME",
]
DEFAULTS = {
    "CONVERSATION_DYNAMO_TABLE_NAME": "quest-dev-conversation",
    "CONVERSATION_SESSION_TABLE_NAME": "quest-dev-session",
    "CONVERSATION_MESSAGE_TABLE_NAME": "quest-dev-conversation-message",
    "USER_DYNAMO_TABLE_NAME": "quest-dev-user",
    "FAMILY_DYNAMO_TABLE_NAME": "quest-dev-family",
    "ANIMAL_DYNAMO_TABLE_NAME": "quest-dev-animal",
    "CMZ_META_TABLE_NAME": "quest-dev-cmz",
    "CMZ_CARE_TABLE_NAME": "quest-dev-cmz-care",
}


def dynamodb_url():
    url = os.environ.get("CMZ_TEST_DYNAMODB_URL")
    if not url:
        pytest.fail("CMZ_TEST_DYNAMODB_URL is not set: start DynamoDB Local (bash .ci/run does)")
    return url


def isolated_tables():
    prefix = "py" + secrets.token_hex(4) + "-"
    return {var: prefix + DEFAULTS[var] for var in TABLE_VARIABLES}


def dynamo_env(extra=None):
    env = dict(isolated_tables())
    env.update(
        {
            "DYNAMODB_ENDPOINT_URL": dynamodb_url(),
            "CMZ_DYNAMODB_CREATE_TABLES": "1",
            "CMZ_DEV_USERS": "embedded",
            "JWT_SECRET": JWT_SECRET,
        }
    )
    env.update(extra or {})
    return env


def memory_env(extra=None):
    env = {"CMZ_DEV_USERS": "embedded", "JWT_SECRET": JWT_SECRET}
    env.update(extra or {})
    return env


def make_client(backend, extra=None):
    if backend == "memory":
        return cmz.Client.from_env(memory_env(extra))
    return cmz.Client.from_env(dynamo_env(extra))


@pytest.fixture(params=["memory", "dynamo"])
def backend(request):
    return request.param


@pytest.fixture
def client(backend):
    return make_client(backend)


@pytest.fixture
def admin(client):
    return client.auth.authenticate(client.auth.login("admin@cmz.org", "admin123")["token"])


def login(client, email, password):
    return client.auth.authenticate(client.auth.login(email, password)["token"])
