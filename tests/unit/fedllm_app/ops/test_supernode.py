"""fedllm-supernode: Flower's SuperNode with its two fixed waits shortened, every other wait Flower's own."""

import subprocess
import sys
import time

import flwr.supernode.start_client_internal as supernode

from fedllm_app.ops.supernode import patch_waits


def test_the_supernode_waits_the_intervals_asked_after_an_empty_pull_and_for_a_reply(monkeypatch):
    monkeypatch.setattr(supernode, "time", supernode.time)  # Flower's module gets its own time back afterwards
    patch_waits(idle_pull=0.01, reply_poll=0.01)
    start = time.monotonic()
    supernode.time.sleep(3)  # Flower's wait after a pull that brought nothing
    supernode.time.sleep(0.5)  # and between two looks for the ClientApp's reply
    assert time.monotonic() - start < 1
    start = time.monotonic()
    supernode.time.sleep(0.2)  # any other wait is left as Flower wrote it
    assert time.monotonic() - start >= 0.2
    assert abs(supernode.time.time() - time.time()) < 1


def test_an_interval_that_is_not_a_number_of_seconds_is_refused_by_name():
    code = "import sys; from fedllm_app.ops.supernode import main; main(sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", code, "--idle-pull-interval", "0"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "'0' is not a number of seconds between 0.01 and 60" in done.stderr


# -- a ClientApp task that fails before it fetched its message (Flower's real node state) -------------------------


def node_state(patched=True):
    """A SuperNode's state (Flower's InMemoryNodeState), with or without the fix, holding one pulled message."""
    from flwr.app import Message, RecordDict
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from fedllm_app.ops.supernode import patch_failed_task_replies

    class State(InMemoryNodeState):  # a subclass: Flower's own class stays unpatched for other tests
        pass

    if patched:
        patch_failed_task_replies(State)
    state = State(ObjectStoreFactory().store())
    message = Message(RecordDict(), dst_node_id=1, message_type="train")
    message.metadata.__dict__["_run_id"] = 7
    message.metadata.__dict__["_message_id"] = message.object_id
    state.store_message(message)
    return state, message


def started_task(state, run_id=7):
    """A ClientApp task of ``run_id``, claimed and running (it pulled its input) but not holding the message yet."""
    from flwr.supercore.constant import TaskType

    task = state.create_task(task_type=TaskType.CLIENT_APP, run_id=run_id, fab_hash="f")
    assert state.claim_task(task) and state.activate_task(task)
    return task


def replies(state):
    return list(state.get_messages_legacy(is_reply=True))  # what the SuperNode's loop waits for


def test_a_task_that_fails_before_fetching_its_message_gets_the_message_an_error_reply_so_the_node_goes_on():
    from flwr.common.constant import ErrorCode, SubStatus

    for patched in (False, True):
        state, message = node_state(patched)
        state.finish_task(started_task(state), SubStatus.FAILED, "the task ran past --input-timeout")
        got = replies(state)
        if not patched:
            assert got == []  # Flower alone: the node waits for this reply for ever
            continue
        assert [r.metadata.reply_to_message_id for r in got] == [message.metadata.message_id]
        assert got[0].has_error() and got[0].error.code == ErrorCode.CLIENT_APP_CRASHED


def test_a_task_whose_heartbeat_expired_before_fetching_its_message_gets_the_message_an_error_reply():
    from datetime import timedelta

    from flwr.supercore.date import now

    state, message = node_state()
    task = started_task(state)
    state.task_token_store[task].active_until = now() - timedelta(seconds=1)  # 60 s without a heartbeat
    got = replies(state)
    assert [r.metadata.reply_to_message_id for r in got] == [message.metadata.message_id] and got[0].has_error()


def test_no_error_reply_while_another_task_of_the_run_may_still_fetch_the_message_or_after_a_real_reply():
    from flwr.app import Message, RecordDict
    from flwr.common.constant import SubStatus
    from flwr.supercore.constant import TaskType

    state, message = node_state()
    state.create_task(task_type=TaskType.CLIENT_APP, run_id=7, fab_hash="f")  # pending: it may fetch it
    state.finish_task(started_task(state), SubStatus.FAILED, "failed")
    assert replies(state) == []

    state, message = node_state()
    task = started_task(state)
    assert list(state.get_messages_legacy(run_ids=[7], is_reply=False, limit=1)) == [message]  # the task fetched it
    reply = Message(RecordDict(), reply_to=message)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    state.store_message(reply)
    state.finish_task(task, SubStatus.FAILED, "failed after replying")
    assert [r.metadata.message_id for r in replies(state)] == [reply.metadata.message_id]  # only its own reply


def test_a_message_whose_run_stops_while_it_is_pulled_is_dropped_with_its_task_not_left_as_a_ghost(monkeypatch):
    """Flower 1.42 kept the task and the content-less message (a ghost whose late reply took the next run's push)."""
    import flwr.supernode.start_client_internal as supernode
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.constant import Status, SubStatus
    from flwr.supercore.constant import TaskType
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run, RunNotRunningException
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from fedllm_app.ops.supernode import patch_stopped_run_messages

    def pull(patched):
        monkeypatch.setattr(supernode, "_pull_and_store_message", supernode._pull_and_store_message)
        monkeypatch.setattr(supernode, "_push_messages", supernode._push_messages)
        if patched:
            patch_stopped_run_messages()
        store = ObjectStoreFactory().store()
        state = InMemoryNodeState(store)
        run = Run.create_empty(7)
        run.primary_task_type, run.fab_hash = TaskType.CLIENT_APP, "f"
        state.store_run(run)
        message = Message(RecordDict({"x": ConfigRecord({"a": 1})}), dst_node_id=1, message_type="train")
        message.metadata.__dict__["_run_id"] = 7
        message.metadata.__dict__["_message_id"] = message.object_id

        def run_stopped(*args):
            raise RunNotRunningException

        got = supernode._pull_and_store_message(
            state=state, object_store=store, node_config={}, receive=lambda: (message, get_object_tree(message)),
            get_run=None, get_fab=None, pull_object=run_stopped, confirm_message_received=None, trusted_entities=None,
        )  # fmt: skip
        return got, state

    got, state = pull(patched=False)  # Flower alone: the ghost
    assert got is None and len(state.msg_store) == 1
    assert [t.status.status for t in state.get_tasks()] == [Status.PENDING]
    got, state = pull(patched=True)
    assert got is None and state.msg_store == {}
    [task] = state.get_tasks()
    assert (task.status.status, task.status.sub_status) == (Status.FINISHED, SubStatus.FAILED)
    assert "its run stopped while this SuperNode pulled it" in task.status.details


def test_a_late_reply_of_an_earlier_message_does_not_take_the_push_of_the_message_pulled_last(monkeypatch):
    """Flower 1.42 pushed only the replies present at its first look: the new message's reply stayed unsent."""
    import threading

    import flwr.supernode.start_client_internal as supernode
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from fedllm_app.ops import supernode as ours

    def message(run_id, reply_to=None):
        content = RecordDict({"x": ConfigRecord({"run": run_id})})
        msg = Message(content, reply_to=reply_to) if reply_to else Message(content, dst_node_id=1, message_type="train")
        msg.metadata.__dict__["_run_id"] = run_id
        return msg

    def push(patched):
        monkeypatch.setattr(supernode, "_push_messages", supernode._push_messages)
        monkeypatch.setattr(supernode, "_pull_and_store_message", supernode._pull_and_store_message)
        if patched:
            ours.patch_push_until_answered()
        store = ObjectStoreFactory().store()
        state = InMemoryNodeState(store)
        stale, current = message(1), message(2)
        for m in (stale, current):
            supernode._insert_message(m, state, store)
        monkeypatch.setitem(ours._PULLED, "message", current.metadata.message_id)  # as its receive noted
        supernode._insert_message(message(1, reply_to=stale), state, store)  # the stopped run's late reply: first
        answer = threading.Timer(0.3, supernode._insert_message, (message(2, reply_to=current), state, store))
        answer.start()
        sent = []
        supernode._push_messages(
            state=state, object_store=store, push_object=None,
            send=lambda msg, tree, runtime: sent.append(msg.metadata.run_id) or (set(), "session"),
        )  # fmt: skip
        answer.join()
        return sent

    assert push(patched=False) == [1]  # Flower alone: the reply of run 2's message is never sent
    assert push(patched=True) == [1, 2]
