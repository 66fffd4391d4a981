"""The one-line reports of the background threads (mirror loop, publisher, express lane) name the error
even when it carries no message; an empty message used to raise inside the handler."""

from lakehouse.mirror import brief


def test_an_error_is_reported_by_type_and_first_line():
    assert brief(ValueError("Postgres is down\ndetails")) == "ValueError: Postgres is down"
    assert brief(RuntimeError("x" * 300)) == "RuntimeError: " + "x" * 200


def test_an_error_without_a_message_is_reported_by_its_type():
    assert brief(ConnectionError()) == "ConnectionError"
    assert brief(OSError("  ")) == "OSError"
