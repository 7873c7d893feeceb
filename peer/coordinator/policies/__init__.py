"""Quorum policies: who takes part in a round, and when it starts (one module per policy, registered here).

A policy is a pure decision, table-tested in ``tests/test_policies.py``: from
the peers waiting for the round (in order of arrival), the live peers, how
long the quorum has waited and the round's id and seed, it answers ``None``
(keep waiting), ``Refuse`` (too few peers are left: today's "no quorum") or
``FormRound`` (the members, in rank order = peer id order); these types, the
``QuorumPolicy`` base and the registry are ``base.py``. The coordinator's
quorums (``peer/coordinator/quorum.py``, ``Quorums.inputs``) gather the inputs
on every request and tick and carry the outcome out; a requesting peer a round forms without is
held until that attempt is decided (see docs/membership.md).

Policies, chosen with the coordinator's ``quorum`` setting (each in its module of this package):

- ``all`` (``allpeers.py``): every live peer, or whoever asked by the join timeout
  (``rules.quorum_ready`` / ``rules.quorum_hopeless``);
- ``first-k:K`` (``firstk.py``): the first K peers to ask, as soon as K have asked; with fewer
  than K live peers, the ``all`` rule over whoever asked;
- ``coded:S[,code=C]`` (``coded.py``): gradient coding's rounds (``optimizers/coded.py``): the
  peers that asked, as soon as they can decode the code over every live peer
  (the roster, sent as the round's candidates) tolerating S stragglers; an
  undecodable or badly conditioned set waits for more, never forms;
- ``allbut:S`` (``allbut.py``): the first n-S of the n live peers to ask (the rest are
  ignored as stragglers; ``allbut:0`` waits for all), roster as candidates;
- ``backup`` (``backup.py``): the first k to ask, k named by the members in the round's tag
  (``sync-sgd:k=K``: dynamic backup workers choose it each step), roster as
  candidates; a tag without k waits for all;
- ``grace:L[,f=F]`` (``grace.py``): sequential gradient coding's rounds: every peer that
  asked, once n-L of the n live peers asked and (1+F) times the (n-L)-th's
  time since the last commit has passed (F default 0.5): workers a little
  late are kept, workers slower by more are the round's stragglers (roster
  as candidates);
- ``buffer:K[,t=T]`` (``buffered.py``): asynchronous rounds (FedBuff): every peer that asked,
  once K have (every live peer, if fewer are live), or T seconds after the
  first one asked; the peers still training are not waited for (roster as
  candidates);
- ``sample:K``, ``sample:F``, ``sample:F,min=M`` (``sample.py``): the k peers
  ``collectives.membership.sampling.sample_members`` draws from the run's seed and the
  round id among the live peers (members can check the draw); k is K, or
  ceil(F x candidates) and at least M (min_peers when M is not given, see
  ``Sample.fitted``), never more than the candidates. The round starts when all of
  them asked, or at the join timeout with those of them that did.

Adding a policy: one module in this package, a ``QuorumPolicy`` subclass (a name, a usage string, how to read its
argument, ``decide``; from ``base.py``, with its helpers) decorated with ``@register``, plus its import below, last:
the imports' order is the order ``policy_forms()`` lists the forms in (help texts, errors), so it is not
alphabetical and must not be sorted. A plugin's policy (``--plugin``) is the same class in the plugin's own
module, imported from ``base.py`` too.
"""

from peer.coordinator.policies.base import (
    POLICIES,
    FormRound,
    Outcome,
    QuorumInputs,
    QuorumPolicy,
    Refuse,
    parse_policy,
    policy_forms,
    register,
)

# The built-in policies register as they are imported, in this order: the order policy_forms() lists them in
# (error messages, help texts), so a new one goes last. Not sorted, then (isort: split and noqa: I001): sorting
# them would change what those texts say.
# isort: split
from peer.coordinator.policies.allpeers import AllPeers  # noqa: I001
from peer.coordinator.policies.firstk import FirstK
from peer.coordinator.policies.sample import Sample
from peer.coordinator.policies.coded import Coded
from peer.coordinator.policies.allbut import AllBut
from peer.coordinator.policies.backup import Backup
from peer.coordinator.policies.grace import Grace
from peer.coordinator.policies.buffered import Buffered

__all__ = [
    "POLICIES",
    "AllBut",
    "AllPeers",
    "Backup",
    "Buffered",
    "Coded",
    "FirstK",
    "FormRound",
    "Grace",
    "Outcome",
    "QuorumInputs",
    "QuorumPolicy",
    "Refuse",
    "Sample",
    "parse_policy",
    "policy_forms",
    "register",
]
