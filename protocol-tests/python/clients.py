"""Python's LDAP clients against one LDAP URL, for protocol-tests/tests/python_clients.rs.

    .venv/bin/python protocol-tests/python/clients.py SCENARIO URL [ARGS...]

Two libraries a Python application would use: python-ldap (a binding to
OpenLDAP's libldap, so its wire behaviour is libldap's) and ldap3 (pure
Python, its own BER encoder and socket handling). Each scenario runs a
fixed sequence of operations against URL and prints one JSON document on
stdout: an object from step name to what the client saw. The Rust test runs
the same scenario against slapd directly and against an identical slapd
behind ldapsync, and requires the two documents to be equal.

The document is canonical so that equal behaviour prints equal text: keys
sorted, entries sorted by DN, attribute values sorted, values decoded as
UTF-8. What legitimately differs between two directories loaded from the
same LDIF (entryUUIDs, CSNs in sync cookies, timestamps) is never printed;
an entryUUID is shown as the DN its entry had when first seen.

Any failure the scenario does not expect raises: the script then exits
non-zero with a traceback on stderr, which the Rust test shows.

The fixture directory (fixtures/data/example.ldif) is assumed: people
uid=NAME,ou=people,dc=example,dc=com with password NAME-secret, root DN
cn=admin,dc=example,dc=com / secret, plain searches limited to 500 entries,
and (for the paged scenarios) 2,500 generated people under ou=bulk.
"""

import json
import queue
import ssl
import sys

import ldap
import ldap.modlist
import ldap.syncrepl
import ldap3
import ldap3.core.exceptions
from ldap.controls import SimplePagedResultsControl
from ldap.ldapobject import SimpleLDAPObject

BASE = "dc=example,dc=com"
PEOPLE = "ou=people," + BASE
GROUPS = "ou=groups," + BASE
BULK = "ou=bulk," + BASE
ADMIN, ADMIN_PW = "cn=admin," + BASE, "secret"

# Every wait for the network is bounded: a client that hangs fails the
# scenario instead of the test run.
TIMEOUT = 10

# RFC 4533 content synchronization.
SYNC_REQUEST_OID = "1.3.6.1.4.1.4203.1.9.1.1"
SYNC_STATE_OID = "1.3.6.1.4.1.4203.1.9.1.2"
SYNC_INFO_OID = "1.3.6.1.4.1.4203.1.9.1.4"
# syncRequestValue ::= SEQUENCE { mode ENUMERATED { refreshAndPersist (3) } }
SYNC_REFRESH_AND_PERSIST = bytes([0x30, 0x03, 0x0A, 0x01, 0x03])
SYNC_STATES = {0: "present", 1: "add", 2: "modify", 3: "delete"}
PAGED_RESULTS_OID = "1.2.840.113556.1.4.319"


def person(uid):
    """The DN and password of a fixture person."""
    return "uid=%s,%s" % (uid, PEOPLE), uid + "-secret"


def text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def attributes(attrs):
    """An entry's attributes, canonical: names as sent, values sorted."""
    return {name: sorted(text(v) for v in values) for name, values in attrs.items()}


def entries(pairs):
    """(dn, attrs) pairs, canonical: sorted by DN."""
    return sorted([text(dn), attributes(attrs)] for dn, attrs in pairs)


# ---------------------------------------------------------------- python-ldap


def pyldap_connect(url):
    conn = ldap.initialize(url)
    conn.protocol_version = ldap.VERSION3
    conn.set_option(ldap.OPT_NETWORK_TIMEOUT, TIMEOUT)
    conn.set_option(ldap.OPT_TIMEOUT, TIMEOUT)
    # Referrals are results to compare, not something to chase.
    conn.set_option(ldap.OPT_REFERRALS, 0)
    return conn


def pyldap_error(e):
    """An LDAPError as the application sees it (message ids left out)."""
    info = e.args[0] if e.args and isinstance(e.args[0], dict) else {}
    return {
        "error": type(e).__name__,
        "result": info.get("result"),
        "desc": info.get("desc"),
        "info": info.get("info", ""),
        "matched": info.get("matched", ""),
    }


def pyldap_do(operation):
    """Runs one synchronous operation: its value, or the error it raised."""
    try:
        value = operation()
    except ldap.LDAPError as e:
        return pyldap_error(e)
    if isinstance(value, tuple) and len(value) == 4:
        # The *_ext_s methods return (type, data, msgid, controls); success
        # is all there is to compare.
        return {"result": 0}
    if isinstance(value, list):
        return {"entries": entries((dn, a) for dn, a in value if dn is not None)}
    return {"value": value}


def pyldap_operations(url):
    """python-ldap's synchronous API: the operations an application uses."""
    out = {}
    alice, alice_pw = person("alice")
    conn = pyldap_connect(url)
    out["whoami anonymous"] = pyldap_do(conn.whoami_s)
    out["bind alice"] = pyldap_do(lambda: conn.simple_bind_s(alice, alice_pw))
    out["whoami alice"] = pyldap_do(conn.whoami_s)
    out["search with a filter"] = pyldap_do(
        lambda: conn.search_ext_s(
            PEOPLE,
            ldap.SCOPE_SUBTREE,
            "(&(objectClass=inetOrgPerson)(|(cn=*AR*)(uid=f*)))",
            ["uid", "cn", "mail"],
        )
    )
    out["search by member"] = pyldap_do(
        lambda: conn.search_ext_s(BASE, ldap.SCOPE_SUBTREE, "(member=%s)" % person("bob")[0], ["cn"])
    )
    out["search no such object"] = pyldap_do(lambda: conn.search_ext_s("ou=nowhere," + BASE, ldap.SCOPE_BASE))
    out["compare true"] = pyldap_do(lambda: conn.compare_s(alice, "mail", b"alice@example.com"))
    out["compare false"] = pyldap_do(lambda: conn.compare_s(alice, "mail", b"bob@example.com"))
    out["compare undefined attribute"] = pyldap_do(lambda: conn.compare_s(alice, "noSuchAttr", b"x"))
    out["modify own entry"] = pyldap_do(
        lambda: conn.modify_ext_s(alice, [(ldap.MOD_REPLACE, "description", [b"set by python-ldap"])])
    )
    out["read own entry back"] = pyldap_do(
        lambda: conn.search_ext_s(alice, ldap.SCOPE_BASE, attrlist=["description"])
    )
    # The directory's ACL: people write only themselves.
    out["modify someone else"] = pyldap_do(
        lambda: conn.modify_ext_s(person("bob")[0], [(ldap.MOD_REPLACE, "description", [b"not yours"])])
    )

    # Asynchronous calls: three requests on the wire before any result is
    # read, results collected in reverse order by message id.
    pipelined = [
        conn.search_ext(PEOPLE, ldap.SCOPE_ONELEVEL, "(uid=carol)", ["mail"]),
        conn.compare_ext(person("dave")[0], "uid", b"dave"),
        conn.search_ext(PEOPLE, ldap.SCOPE_ONELEVEL, "(uid=nobody)", ["mail"]),
    ]
    results = {}
    for name, msgid in reversed(list(zip(["search carol", "compare dave", "search nobody"], pipelined))):
        try:
            _, data, _, _ = conn.result3(msgid, all=1, timeout=TIMEOUT)
            results[name] = {"entries": entries(data)}
        except ldap.COMPARE_TRUE:
            results[name] = {"compare": True}
        except ldap.LDAPError as e:
            results[name] = pyldap_error(e)
    out["pipelined"] = results

    out["bind wrong password"] = pyldap_do(lambda: conn.simple_bind_s(alice, "wrong"))
    # A failed bind leaves the session anonymous (RFC 4511 §4.2.1).
    out["whoami after failed bind"] = pyldap_do(conn.whoami_s)

    out["bind admin"] = pyldap_do(lambda: conn.simple_bind_s(ADMIN, ADMIN_PW))
    nina = "uid=nina," + PEOPLE
    new_person = ldap.modlist.addModlist(
        {
            "objectClass": [b"inetOrgPerson"],
            "uid": [b"nina"],
            "cn": [b"Nina Nash"],
            "sn": [b"Nash"],
            "mail": [b"nina@example.com"],
        }
    )
    out["add"] = pyldap_do(lambda: conn.add_ext_s(nina, new_person))
    out["add existing"] = pyldap_do(lambda: conn.add_ext_s(nina, new_person))
    out["modrdn"] = pyldap_do(lambda: conn.rename_s(nina, "uid=nora", delold=1))
    out["delete"] = pyldap_do(lambda: conn.delete_ext_s("uid=nora," + PEOPLE))
    out["delete missing"] = pyldap_do(lambda: conn.delete_ext_s("uid=nobody," + PEOPLE))
    out["people after the writes"] = pyldap_do(
        lambda: conn.search_ext_s(PEOPLE, ldap.SCOPE_ONELEVEL, "(objectClass=*)", ["uid", "description"])
    )
    conn.unbind_s()
    return out


def pyldap_paging_and_limits(url):
    """RFC 2696 paging through 2,500 entries, and the server's size limit."""
    out = {}
    alice, alice_pw = person("alice")
    conn = pyldap_connect(url)
    conn.simple_bind_s(alice, alice_pw)

    page_sizes, dns = [], []
    paging = SimplePagedResultsControl(True, size=500, cookie=b"")
    while True:
        msgid = conn.search_ext(
            BULK, ldap.SCOPE_ONELEVEL, "(objectClass=inetOrgPerson)", ["uid"], serverctrls=[paging]
        )
        _, data, _, ctrls = conn.result3(msgid, timeout=TIMEOUT)
        page_sizes.append(len(data))
        dns.extend(dn for dn, _ in data)
        cookies = [c.cookie for c in ctrls if c.controlType == SimplePagedResultsControl.controlType]
        if not cookies or not cookies[0]:
            break
        paging.cookie = cookies[0]
    out["paged search"] = {"page sizes": page_sizes, "dns": sorted(dns)}

    # Without paging the directory stops at its limit of 500 and says so
    # (sizeLimitExceeded, 4) after sending the entries that fit.
    msgid = conn.search_ext(BULK, ldap.SCOPE_ONELEVEL, "(objectClass=inetOrgPerson)", ["uid"])
    received = 0
    try:
        while True:
            rtype, data, _, _ = conn.result3(msgid, all=0, timeout=TIMEOUT)
            received += len(data)
            if rtype == ldap.RES_SEARCH_RESULT:
                out["server size limit"] = {"entries": received, "result": 0}
                break
    except ldap.SIZELIMIT_EXCEEDED as e:
        out["server size limit"] = dict(pyldap_error(e), entries=received)

    # The client's own size limit travels in the request.
    try:
        conn.search_ext_s(PEOPLE, ldap.SCOPE_ONELEVEL, "(uid=*)", ["uid"], sizelimit=2)
        out["client size limit"] = {"result": 0}
    except ldap.SIZELIMIT_EXCEEDED as e:
        out["client size limit"] = pyldap_error(e)
    conn.unbind_s()
    return out


def pyldap(url):
    out = pyldap_operations(url)
    out.update(pyldap_paging_and_limits(url))
    return out


# --------------------------------------------------------------------- ldap3


def ldap3_server(url, tls=None):
    return ldap3.Server(url, connect_timeout=TIMEOUT, tls=tls)


def ldap3_connection(url, user=None, password=None, strategy=ldap3.SYNC, tls=None):
    return ldap3.Connection(
        ldap3_server(url, tls),
        user=user,
        password=password,
        client_strategy=strategy,
        receive_timeout=TIMEOUT,
        raise_exceptions=False,
        auto_referrals=False,
    )


def ldap3_result(result):
    """An ldap3 result dict as the application sees it."""
    return {
        "result": result["result"],
        "description": result["description"],
        "message": result["message"],
        "matched": result["dn"],
        "type": result["type"],
    }


def ldap3_entries(response):
    """Search entries of an ldap3 response, canonical (raw values)."""
    return entries(
        (r["raw_dn"], r["raw_attributes"]) for r in (response or []) if r["type"] == "searchResEntry"
    )


def ldap3_do(conn, operation):
    """Runs one operation on a synchronous connection: what it returned,
    the result and any entries."""
    value = operation()
    seen = {"returned": value, **ldap3_result(conn.result)}
    if conn.result["type"] == "searchResDone":
        seen["entries"] = ldap3_entries(conn.response)
    return seen


def ldap3_operations(url):
    """ldap3's synchronous strategy: the same operations as python-ldap's."""
    out = {}
    alice, alice_pw = person("alice")
    conn = ldap3_connection(url, alice, alice_pw)
    conn.open()
    out["whoami anonymous"] = conn.extend.standard.who_am_i()
    out["bind alice"] = ldap3_do(conn, conn.bind)
    out["whoami alice"] = conn.extend.standard.who_am_i()
    out["search with a filter"] = ldap3_do(
        conn,
        lambda: conn.search(
            PEOPLE,
            "(&(objectClass=inetOrgPerson)(|(cn=*AR*)(uid=f*)))",
            attributes=["uid", "cn", "mail"],
        ),
    )
    out["search no such object"] = ldap3_do(conn, lambda: conn.search("ou=nowhere," + BASE, "(objectClass=*)"))
    out["compare true"] = ldap3_do(conn, lambda: conn.compare(alice, "mail", "alice@example.com"))
    out["compare false"] = ldap3_do(conn, lambda: conn.compare(alice, "mail", "bob@example.com"))
    out["modify own entry"] = ldap3_do(
        conn, lambda: conn.modify(alice, {"description": [(ldap3.MODIFY_REPLACE, ["set by ldap3"])]})
    )
    out["read own entry back"] = ldap3_do(
        conn, lambda: conn.search(alice, "(objectClass=*)", ldap3.BASE, attributes=["description"])
    )
    out["modify someone else"] = ldap3_do(
        conn,
        lambda: conn.modify(person("bob")[0], {"description": [(ldap3.MODIFY_REPLACE, ["not yours"])]}),
    )

    # Paging by hand, to see each page the directory sends.
    page_sizes, dns, cookie = [], [], None
    while True:
        conn.search(
            BULK,
            "(objectClass=inetOrgPerson)",
            ldap3.LEVEL,
            attributes=["uid"],
            paged_size=500,
            paged_cookie=cookie,
        )
        page = ldap3_entries(conn.response)
        page_sizes.append(len(page))
        dns.extend(dn for dn, _ in page)
        cookie = conn.result["controls"][PAGED_RESULTS_OID]["value"]["cookie"]
        if not cookie:
            break
    out["paged search"] = {"page sizes": page_sizes, "dns": sorted(dns)}
    conn.search(BULK, "(objectClass=inetOrgPerson)", ldap3.LEVEL, attributes=["uid"])
    out["server size limit"] = dict(ldap3_result(conn.result), entries=len(ldap3_entries(conn.response)))

    out["bind wrong password"] = ldap3_do(conn, lambda: conn.rebind(alice, "wrong"))
    out["whoami after failed bind"] = conn.extend.standard.who_am_i()
    out["bind admin"] = ldap3_do(conn, lambda: conn.rebind(ADMIN, ADMIN_PW))
    nina = "uid=nina," + PEOPLE
    new_person = {"uid": "nina", "cn": "Nina Nash", "sn": "Nash", "mail": "nina@example.com"}
    out["add"] = ldap3_do(conn, lambda: conn.add(nina, ["inetOrgPerson"], new_person))
    out["add existing"] = ldap3_do(conn, lambda: conn.add(nina, ["inetOrgPerson"], new_person))
    out["modrdn"] = ldap3_do(conn, lambda: conn.modify_dn(nina, "uid=nora", delete_old_dn=True))
    out["delete"] = ldap3_do(conn, lambda: conn.delete("uid=nora," + PEOPLE))
    out["delete missing"] = ldap3_do(conn, lambda: conn.delete("uid=nobody," + PEOPLE))
    out["people after the writes"] = ldap3_do(
        conn,
        lambda: conn.search(PEOPLE, "(objectClass=*)", ldap3.LEVEL, attributes=["uid", "description"]),
    )
    conn.unbind()
    return out


class Ldap3SyncSearch:
    """An RFC 4533 refreshAndPersist search on an ldap3 ASYNC_STREAM
    connection: every message for it lands in a queue as it arrives, which
    is how ldap3 delivers a search that never ends."""

    def __init__(self, conn, base, filter_):
        self.conn = conn
        self.messages = queue.Queue()
        conn.strategy.callback = self.messages.put
        # ldap3 streams a message id's responses only once it is told which
        # id to stream; holding the receiver's lock while sending means no
        # early response lands elsewhere in between.
        with conn.strategy.async_lock:
            self.msgid = conn.search(
                base,
                filter_,
                attributes=["uid", "description"],
                # RFC 4533 searches must not dereference aliases; slapd
                # refuses them otherwise (ldap3 defaults to DEREF_ALWAYS).
                dereference_aliases=ldap3.DEREF_NEVER,
                controls=[(SYNC_REQUEST_OID, True, SYNC_REFRESH_AND_PERSIST)],
            )
            conn.strategy.persistent_search_message_id = self.msgid

    def next(self):
        """The next message for the search, as (kind, detail)."""
        try:
            message = self.messages.get(timeout=TIMEOUT)
        except queue.Empty:
            raise TimeoutError("no message for the persistent search within %d s" % TIMEOUT)
        return describe_ldap3_sync_message(message)

    def until_refresh_done(self):
        """The refresh phase: its entries (sorted) and the message ending it."""
        refresh = []
        while True:
            kind, detail = self.next()
            if kind == "entry":
                refresh.append(detail)
            else:
                return sorted(refresh), [kind, detail]

    def received_so_far(self):
        """What arrived and was not read yet, without waiting."""
        seen = []
        while not self.messages.empty():
            seen.append(describe_ldap3_sync_message(self.messages.get_nowait()))
        return seen


def ber_tlv(data, at=0):
    """(tag, contents, next offset) of the BER element at `at`."""
    tag, length, at = data[at], data[at + 1], at + 2
    if length & 0x80:
        size = length & 0x7F
        length, at = int.from_bytes(data[at : at + size], "big"), at + size
    return tag, data[at : at + length], at + length


def describe_ldap3_sync_message(message):
    """(kind, detail) of one message of a sync search as ldap3 hands it
    over: an entry with its sync state, a Sync Info message, or the end."""
    if message["type"] == "searchResEntry":
        # syncStateValue ::= SEQUENCE { state ENUMERATED, entryUUID, cookie OPTIONAL }
        _, sequence, _ = ber_tlv(message["controls"][SYNC_STATE_OID]["value"])
        _, state, _ = ber_tlv(sequence)
        return "entry", [SYNC_STATES[state[0]], text(message["raw_dn"])]
    if message["type"] == "intermediateResponse" and message["responseName"] == SYNC_INFO_OID:
        tag = message["responseValue"][0]
        kinds = {0x80: "newcookie", 0xA1: "refreshDelete", 0xA2: "refreshPresent", 0xA3: "syncIdSet"}
        return "sync info", kinds.get(tag, "tag 0x%02x" % tag)
    return message["type"], ldap3_result(message) if "result" in message else message.get("responseName")


def ldap3_async(url):
    """ldap3's asynchronous strategies: pipelined requests, and abandoning a
    search that is still running."""
    out = {}
    alice, alice_pw = person("alice")
    admin = ldap3_connection(url, ADMIN, ADMIN_PW)
    admin.bind()

    # ASYNC: each request returns its message id at once; five are on the
    # wire before the first result is read, and results are read last first.
    conn = ldap3_connection(url, alice, alice_pw, strategy=ldap3.ASYNC)
    conn.open()
    conn.bind()
    requests = [
        ("search %s" % uid, conn.search(PEOPLE, "(uid=%s)" % uid, attributes=["mail"]))
        for uid in ("alice", "bob", "nobody")
    ]
    requests.append(("compare carol", conn.compare(person("carol")[0], "uid", "carol")))
    requests.append(
        ("modify own entry", conn.modify(alice, {"description": [(ldap3.MODIFY_REPLACE, ["pipelined"])]}))
    )
    pipelined = {}
    for name, msgid in reversed(requests):
        response, result = conn.get_response(msgid, timeout=TIMEOUT)
        pipelined[name] = dict(ldap3_result(result), entries=ldap3_entries(response))
    out["pipelined"] = pipelined
    conn.unbind()

    # A persistent search never ends by itself: the one search that is
    # certainly still running when the abandon arrives. A second one, on
    # another connection, witnesses what the directory sends meanwhile.
    conn = ldap3_connection(url, alice, alice_pw, strategy=ldap3.ASYNC_STREAM)
    conn.open()
    conn.bind()
    watched = Ldap3SyncSearch(conn, PEOPLE, "(uid=n*)")
    out["refresh"] = watched.until_refresh_done()
    witness_conn = ldap3_connection(url, alice, alice_pw, strategy=ldap3.ASYNC_STREAM)
    witness_conn.open()
    witness_conn.bind()
    witness = Ldap3SyncSearch(witness_conn, PEOPLE, "(uid=n*)")
    witness.until_refresh_done()

    nina = "uid=nina," + PEOPLE
    out["add nina"] = ldap3_do(
        admin, lambda: admin.add(nina, ["inetOrgPerson"], {"uid": "nina", "cn": "Nina Nash", "sn": "Nash"})
    )
    out["persistent search sees the add"] = watched.next()
    witness.next()

    # Other operations on the same connection while the search persists.
    msgid = conn.search(PEOPLE, "(uid=nina)", attributes=["cn"])
    response, result = conn.get_response(msgid, timeout=TIMEOUT)
    out["search beside the persistent one"] = dict(ldap3_result(result), entries=ldap3_entries(response))

    out["abandon"] = conn.abandon(watched.msgid)
    out["whoami after abandon"] = conn.extend.standard.who_am_i()
    out["modify nina"] = ldap3_do(
        admin, lambda: admin.modify(nina, {"description": [(ldap3.MODIFY_REPLACE, ["after the abandon"])]})
    )
    # Once the witness has the change and a request on the abandoned
    # search's connection has been answered after it, anything the
    # abandoned search was still sent would have arrived.
    out["witness sees the modify"] = witness.next()
    out["whoami after the modify"] = conn.extend.standard.who_am_i()
    out["abandoned search received after the abandon"] = watched.received_so_far()
    witness_conn.abandon(witness.msgid)
    for c in (conn, witness_conn, admin):
        c.unbind()
    return out


# ------------------------------------------------------------ syncrepl (python-ldap)


class Consumer(SimpleLDAPObject, ldap.syncrepl.SyncreplConsumer):
    """A python-ldap syncrepl consumer that records what it is told.

    The SyncreplConsumer callbacks are the application's view (an entry was
    added or changed, these UUIDs were deleted, the refresh is done, a new
    cookie); result4 is wrapped to also record each message's sync state
    as it came off the wire (add, modify, delete), which the callbacks
    merge."""

    def __init__(self, url):
        SimpleLDAPObject.__init__(self, url)
        self.set_option(ldap.OPT_NETWORK_TIMEOUT, TIMEOUT)
        self.sync_msgid = None
        self.refresh_done = False
        self.cookie = None
        self.refresh = []  # (state, dn) before the refresh is done
        self.changes = []  # (state, dn, attributes, entry first seen as) after
        self.callbacks = []  # the callbacks from the end of the refresh on
        self.first_dn = {}  # entryUUID -> the DN its entry was first seen with

    def entry_name(self, uuid):
        return "entry first seen as " + self.first_dn.get(uuid, "an unknown UUID")

    def result4(self, *args, **kwargs):
        rtype, data, msgid, ctrls, name, value = super().result4(*args, **kwargs)
        if msgid == self.sync_msgid and rtype == ldap.RES_SEARCH_ENTRY:
            for dn, attrs, entry_ctrls in data:
                for c in entry_ctrls:
                    if isinstance(c, ldap.syncrepl.SyncStateControl):
                        self.first_dn.setdefault(c.entryUUID, dn)
                        if self.refresh_done:
                            self.changes.append([c.state, dn, attributes(attrs), self.entry_name(c.entryUUID)])
                        else:
                            self.refresh.append([c.state, dn])
        if msgid == self.sync_msgid and rtype == ldap.RES_INTERMEDIATE:
            for oid, value, _ in data:
                if oid == ldap.syncrepl.SyncInfoMessage.responseName:
                    info = ldap.syncrepl.SyncInfoMessage(value)
                    kinds = ("newcookie", "refreshDelete", "refreshPresent", "syncIdSet")
                    oid = "Sync Info " + next(k for k in kinds if getattr(info, k) is not None)
                self.callbacks.append(["intermediate", oid])
        return rtype, data, msgid, ctrls, name, value

    def syncrepl_entry(self, dn, attrs, uuid):
        # The refresh phase's entries are in `refresh`, in sorted order.
        if self.refresh_done:
            self.callbacks.append(["entry", dn])

    def syncrepl_delete(self, uuids):
        self.callbacks.append(["delete", [self.entry_name(u) for u in uuids]])

    def syncrepl_present(self, uuids, refreshDeletes=False):
        # During the refresh it is called once per entry; only the calls
        # that end a phase say something beyond the entries themselves.
        if uuids is None:
            self.callbacks.append(["present", None, refreshDeletes])

    def syncrepl_refreshdone(self):
        self.refresh_done = True
        self.callbacks.append(["refresh done"])

    def syncrepl_set_cookie(self, cookie):
        self.cookie = cookie

    def syncrepl_get_cookie(self):
        return self.cookie

    def start(self, base):
        self.sync_msgid = self.syncrepl_search(
            base, ldap.SCOPE_SUBTREE, mode="refreshAndPersist", attrlist=["uid", "description"]
        )

    def poll_until(self, done, what):
        """Processes messages until `done()` holds; fails after TIMEOUT."""
        while not done():
            try:
                if not self.syncrepl_poll(msgid=self.sync_msgid, timeout=TIMEOUT):
                    raise AssertionError("the persistent search ended while waiting for " + what)
            except ldap.TIMEOUT:
                raise TimeoutError("no %s within %d s" % (what, TIMEOUT))


def syncrepl(url):
    """RFC 4533 refreshAndPersist with python-ldap's SyncreplConsumer: the
    refresh, then each change made on another connection while the search
    persists, in order."""
    out = {}
    alice, alice_pw = person("alice")
    consumer = Consumer(url)
    consumer.simple_bind_s(alice, alice_pw)
    consumer.start(PEOPLE)
    consumer.poll_until(lambda: consumer.refresh_done, "end of the refresh phase")
    out["refresh"] = sorted(consumer.refresh)
    out["cookie after the refresh"] = consumer.cookie is not None

    writer = pyldap_connect(url)
    writer.simple_bind_s(ADMIN, ADMIN_PW)
    reader = pyldap_connect(url)
    reader.simple_bind_s(alice, alice_pw)
    nina = "uid=nina," + PEOPLE
    changes = [
        (
            "add nina",
            lambda: writer.add_ext_s(
                nina,
                ldap.modlist.addModlist(
                    {"objectClass": [b"inetOrgPerson"], "uid": [b"nina"], "cn": [b"Nina Nash"], "sn": [b"Nash"]}
                ),
            ),
        ),
        (
            "modify alice",
            lambda: writer.modify_ext_s(alice, [(ldap.MOD_REPLACE, "description", [b"changed while persisting"])]),
        ),
        ("rename nina", lambda: writer.rename_s(nina, "uid=nora", delold=1)),
        # Outside the searched subtree: nothing may arrive for it, which the
        # next change proves (the directory sends changes in order).
        (
            "modify a group",
            lambda: writer.modify_ext_s("cn=staff," + GROUPS, [(ldap.MOD_ADD, "member", [nina.encode()])]),
        ),
        ("delete nora", lambda: writer.delete_ext_s("uid=nora," + PEOPLE)),
    ]
    for name, change in changes:
        out[name] = pyldap_do(change)
        if "error" in out[name]:
            raise AssertionError("%s failed: %r" % (name, out[name]))
        if name == "modify a group":
            continue
        seen = len(consumer.changes)
        consumer.poll_until(lambda: len(consumer.changes) > seen, "change after " + name)
        if name == "add nina":
            # Other searches while the persistent one is open: on another
            # connection, and on the consumer's own connection.
            out["search on another connection"] = pyldap_do(
                lambda: reader.search_ext_s(PEOPLE, ldap.SCOPE_ONELEVEL, "(uid=n*)", ["uid"])
            )
            out["search on the same connection"] = pyldap_do(
                lambda: consumer.search_ext_s(PEOPLE, ldap.SCOPE_ONELEVEL, "(uid=n*)", ["uid"])
            )
    out["changes"] = consumer.changes
    out["callbacks"] = consumer.callbacks
    consumer.abandon(consumer.sync_msgid)
    out["whoami after abandoning"] = pyldap_do(consumer.whoami_s)
    for c in (consumer, writer, reader):
        c.unbind_s()
    return out


# ------------------------------------------------------------------ StartTLS


def starttls(url, ca_file, untrusted_ca_file):
    """StartTLS (RFC 4511 §4.14) with both libraries, trusting `ca_file`
    and checking the server's name; then a client trusting only
    `untrusted_ca_file`, which must refuse the server."""
    out = {}
    alice, alice_pw = person("alice")

    def pyldap_tls(ca):
        conn = pyldap_connect(url)
        conn.set_option(ldap.OPT_X_TLS_CACERTFILE, ca)
        conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
        # Applies the options above to this connection's own TLS context.
        conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
        return conn

    # A bind made before StartTLS does not survive it (slapd's behaviour).
    conn = pyldap_tls(ca_file)
    out["python-ldap bind before starttls"] = pyldap_do(lambda: conn.simple_bind_s(alice, alice_pw))
    out["python-ldap starttls after a bind"] = pyldap_do(conn.start_tls_s)
    out["python-ldap whoami after starttls"] = pyldap_do(conn.whoami_s)
    conn.unbind_s()

    conn = pyldap_tls(ca_file)
    out["python-ldap starttls"] = pyldap_do(conn.start_tls_s)
    # GnuTLS's names (libldap on Debian uses GnuTLS).
    out["python-ldap under TLS"] = conn.get_option(ldap.OPT_X_TLS_VERSION) in ("TLS1.2", "TLS1.3")
    out["python-ldap bind"] = pyldap_do(lambda: conn.simple_bind_s(alice, alice_pw))
    out["python-ldap whoami"] = pyldap_do(conn.whoami_s)
    out["python-ldap search"] = pyldap_do(
        lambda: conn.search_ext_s(PEOPLE, ldap.SCOPE_ONELEVEL, "(uid=alice)", ["cn", "mail"])
    )
    conn.unbind_s()
    refused = pyldap_tls(untrusted_ca_file)
    out["python-ldap starttls, untrusted certificate"] = pyldap_do(refused.start_tls_s)

    def ldap3_tls(ca):
        tls = ldap3.Tls(ca_certs_file=ca, validate=ssl.CERT_REQUIRED)
        return ldap3_connection(url, alice, alice_pw, tls=tls)

    conn = ldap3_tls(ca_file)
    conn.open()
    out["ldap3 starttls"] = conn.start_tls()
    out["ldap3 under TLS"] = conn.tls_started and conn.socket.version() in ("TLSv1.2", "TLSv1.3")
    out["ldap3 bind"] = ldap3_do(conn, conn.bind)
    out["ldap3 whoami"] = conn.extend.standard.who_am_i()
    out["ldap3 search"] = ldap3_do(
        conn, lambda: conn.search(PEOPLE, "(uid=alice)", ldap3.LEVEL, attributes=["cn", "mail"])
    )
    conn.unbind()
    refused = ldap3_tls(untrusted_ca_file)
    refused.open()
    try:
        out["ldap3 starttls, untrusted certificate"] = refused.start_tls()
    except ldap3.core.exceptions.LDAPException as e:
        out["ldap3 starttls, untrusted certificate"] = type(e).__name__
    return out


def pyldap_reconnect(url):
    """python-ldap's ReconnectLDAPObject, started while the directory is
    down (the test brings it back a moment later). It retries only on
    SERVER_DOWN (and TIMEOUT): a directory it cannot contact, never one
    that answers "unavailable"."""
    from ldap.ldapobject import ReconnectLDAPObject

    conn = ReconnectLDAPObject(url, retry_max=60, retry_delay=0.25)
    conn.protocol_version = ldap.VERSION3
    conn.set_option(ldap.OPT_NETWORK_TIMEOUT, TIMEOUT)
    conn.set_option(ldap.OPT_TIMEOUT, TIMEOUT)
    return {
        "bind": pyldap_do(lambda: conn.simple_bind_s(ADMIN, ADMIN_PW)),
        "search": pyldap_do(lambda: conn.search_s(BASE, ldap.SCOPE_BASE, "(objectClass=*)", ["dc"])),
        "whoami": pyldap_do(conn.whoami_s),
    }


SCENARIOS = {
    "python-ldap": pyldap,
    "reconnect": pyldap_reconnect,
    "ldap3": ldap3_operations,
    "ldap3-async": ldap3_async,
    "syncrepl": syncrepl,
    "starttls": starttls,
}


def main(argv):
    if len(argv) < 3 or argv[1] not in SCENARIOS:
        sys.exit("usage: clients.py {%s} URL [ARGS...]" % "|".join(SCENARIOS))
    result = SCENARIOS[argv[1]](*argv[2:])
    json.dump(result, sys.stdout, sort_keys=True, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv)
