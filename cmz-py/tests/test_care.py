"""Cost and care from Python: daily token budgets, feedback, the staff review queue and
the usage report, on both backends (the same services as over HTTP)."""

import datetime

import pytest

import cmz

from conftest import login, make_client


def test_a_user_over_the_daily_token_budget_is_refused_with_the_budget(backend):
    client = make_client(backend, {"CMZ_DAILY_TOKEN_BUDGET_USER": "1"})
    ana = login(client, "student1@cmz.org", "student123")
    first = client.conversations.turn(ana, "cougar", "hello")
    budget = first["rateLimit"]["tokenBudgets"][0]
    assert budget["scope"] == "user" and budget["budget"] == 1 and budget["used"] >= 1
    assert first["rateLimit"]["dailyUsage"] == 1
    assert first["rateLimit"]["remaining"] == 49
    with pytest.raises(cmz.RateLimited) as refused:
        client.conversations.turn(ana, "cougar", "again", session_id=first["sessionId"])
    error = refused.value
    assert error.code == "rate_limit_exceeded"
    assert error.details["budget"] == "user" and error.details["limit"] == 1
    assert error.details["resetTime"].endswith("T00:00:00Z")
    assert 0 < error.retry_after <= 86_400
    assert len(client.conversations.history(ana, first["sessionId"])["messages"]) == 2
    assert client.conversations.budgets(ana)[0]["used"] == budget["used"]
    # Another child has their own budget.
    leo = login(client, "student2@cmz.org", "student123")
    client.conversations.turn(leo, "cougar", "hi")
    with pytest.raises(cmz.ValidationError):
        make_client(backend, {"CMZ_DAILY_TOKEN_BUDGET_FAMILY": "lots"})


def test_feedback_the_review_queue_and_usage(backend):
    client = make_client(backend)
    ana = login(client, "student1@cmz.org", "student123")
    kim = login(client, "other@cmz.org", "other123")
    admin = login(client, "admin@cmz.org", "admin123")
    reply = client.conversations.turn(ana, "cougar", "how fast can you run?")
    session, message = reply["sessionId"], reply["assistantMessage"]["messageId"]
    assert client.conversations.my_feedback(ana, session, message) is None
    up = client.conversations.feedback(ana, session, message, "up", note="great!")
    assert up["vote"] == "up" and up["note"] == "great!" and up["seq"] == 2
    down = client.conversations.feedback(ana, session, message, "down")
    assert client.conversations.my_feedback(ana, session, message)["vote"] == "down"
    assert down["persona"] == "Cora the Cougar"
    with pytest.raises(cmz.NotFound):
        client.conversations.feedback(kim, session, message, "down")
    with pytest.raises(cmz.ValidationError):
        client.conversations.feedback(ana, session, message, "meh")
    with pytest.raises(cmz.ValidationError):
        client.conversations.feedback(ana, session, reply["userMessage"]["messageId"], "down")

    with pytest.raises(cmz.Forbidden):
        client.conversations.review_queue(ana)
    queue = client.conversations.review_queue(admin)
    assert [item["reasons"] for item in queue["items"]] == [["thumbs_down"]]
    item = queue["items"][0]
    assert item["messageId"] == message and item["ownerId"] == "user_student_ana"
    opened = client.conversations.review_item(admin, item["id"], around=1)
    assert [m["role"] for m in opened["messages"]] == ["user", "assistant"]
    marked = client.conversations.mark_reviewed(admin, item["id"], note="fine")
    assert marked["review"]["by"] == "user_admin" and marked["review"]["note"] == "fine"
    with pytest.raises(cmz.NotFound):
        client.conversations.mark_reviewed(admin, item["id"])
    assert client.conversations.review_queue(admin)["items"] == []
    assert client.conversations.review_queue(admin, state="reviewed")["items"][0]["id"] == item["id"]

    client.conversations.turn(kim, "porcupine", "hello")
    report = client.conversations.usage(admin, group_by="user,animal")
    assert report["total"]["turns"] == 2
    users = sorted((row["userId"], row["animalId"], row["turns"]) for row in report["rows"])
    assert users == [("user_student_ana", "cougar", 1), ("user_student_kim", "porcupine", 1)]
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    csv = client.conversations.usage(admin, start=today, end=today, group_by="day", csv=True)
    assert csv.splitlines()[0].startswith("day,familyId,userId")
    assert csv.splitlines()[1].startswith(today + ",,,,,")
    with pytest.raises(cmz.Forbidden):
        client.conversations.usage(ana)
    with pytest.raises(cmz.ValidationError):
        client.conversations.usage(admin, start="last week")

    # An erasure takes the child's feedback and usage with it.
    client.erase_user(admin, "user_student_ana")
    after = client.conversations.usage(admin, group_by="user")
    assert [row["userId"] for row in after["rows"]] == ["user_student_kim"]
    assert client.conversations.review_queue(admin, state="reviewed")["items"] == []
