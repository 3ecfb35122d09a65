using CsCheck;
using static OrleansIdempotency.Grains.IdempotencyTransitions;

namespace OrleansIdempotency.Grains.Tests;

/// <summary>
/// Any interleaving of claims, completions, renewals, releases, expiry and time passing, checked against the two
/// promises of DESIGN §2: at most one holder of a valid claim at any moment, and a completed key replays the same
/// bytes until it expires. First on the pure state machine (many runs), then on the grain itself, step for step
/// against the machine (fewer runs: each is a cluster round trip per step).
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class StateMachinePropertyTests(ClusterFixture fixture)
{
    private static readonly TimeSpan Lease = TimeSpan.FromSeconds(10);
    private static readonly TimeSpan Retention = TimeSpan.FromSeconds(100);
    private static readonly byte[][] Fingerprints = [[1], [2]];
    private static readonly StoredResponse[] Responses =
        [new(201, [], "first"u8.ToArray(), false, 5), new(400, [], "second"u8.ToArray(), false, 6)];

    /// <summary>One step: which operation, which attempt (0–3) or issued token, which request or response, how far time moves.</summary>
    public readonly record struct Step(int Operation, int Attempt, int Variant, int Seconds, bool Reclaim)
    {
        public override string ToString() => Operation switch
        {
            0 => $"claim(attempt {Attempt}, request {Variant}{(Reclaim ? ", reclaim" : "")})",
            1 => $"complete(token {Attempt}, response {Variant})",
            2 => $"renew(token {Attempt})",
            3 => $"release(attempt {Attempt})",
            _ => $"advance({Seconds} s)",
        };
    }

    private static readonly Gen<Step[]> Scenarios = Gen.Select(Gen.Int[0, 4], Gen.Int[0, 3], Gen.Int[0, 1], Gen.Int[0, 120], Gen.Bool)
        .Select(t => new Step(t.Item1, t.Item2, t.Item3, t.Item4 <= 100 ? t.Item4 / 10 : t.Item4, t.Item5))
        .Array[1, 40];

    [Fact]
    public void StateMachine_AnyInterleaving_KeepsOneHolderAndStableReplays()
    {
        Scenarios.Sample(steps =>
        {
            var model = new Model(new DateTimeOffset(2026, 1, 1, 0, 0, 0, TimeSpan.Zero));
            foreach (var step in steps)
            {
                model.Apply(step);
            }
        }, iter: 20_000, print: steps => string.Join(" → ", steps));
    }

    [Fact]
    public async Task Grain_AnyInterleaving_BehavesAsTheStateMachine()
    {
        await Scenarios.SampleAsync(async steps =>
        {
            var grain = fixture.Grains.GetIdempotencyGrain(new IdempotencyKey("property", Guid.NewGuid().ToString("N")));
            var model = new Model(fixture.Time.GetUtcNow());
            foreach (var step in steps)
            {
                if (step.Operation == 4)
                {
                    fixture.Time.Advance(TimeSpan.FromSeconds(step.Seconds));
                }

                var expected = model.Apply(step);
                var actual = step.Operation switch
                {
                    0 => (object)await grain.ClaimAsync(model.Request(step)),
                    1 when model.Token(step) is { } token => await grain.CompleteAsync(token, Responses[step.Variant]),
                    2 when model.Token(step) is { } token => await grain.RenewAsync(token, Lease),
                    3 => await grain.ReleaseAsync(Model.Attempts[step.Attempt], Lease),
                    _ => null,
                };
                Assert.Equal(Describe(expected), Describe(actual));
            }
        }, iter: 150, threads: 1, print: steps => string.Join(" → ", steps));
    }

    private static string Describe(object? result) => result switch
    {
        ClaimResult claim => $"{claim.Outcome} {claim.Token} {claim.LeaseExpiresAt:O} {(claim.Response is { } r ? Convert.ToBase64String(r.Body) : "")}",
        null => "",
        _ => result.ToString()!,
    };

    /// <summary>Runs the steps on the pure machine and checks the invariants after each.</summary>
    private sealed class Model(DateTimeOffset start)
    {
        public static readonly Guid[] Attempts = [Guid.NewGuid(), Guid.NewGuid(), Guid.NewGuid(), Guid.NewGuid()];

        private readonly List<ClaimToken> issued = [];
        private readonly Dictionary<ClaimToken, DateTimeOffset> leaseEnds = [];
        private readonly HashSet<ClaimToken> released = [];
        private IdempotencyRecord record = new();
        private StoredResponse? completed;
        private long lastFence;

        public DateTimeOffset Now { get; private set; } = start;

        public ClaimRequest Request(Step step) =>
            new(Attempts[step.Attempt], Fingerprints[step.Variant], Lease, Retention, step.Reclaim ? LapsedLeasePolicy.Reclaim : LapsedLeasePolicy.OutcomeUnknown);

        public ClaimToken? Token(Step step) => issued.Count == 0 ? null : issued[step.Attempt % issued.Count];

        /// <returns>What the operation answered (null for a step that does nothing).</returns>
        public object? Apply(Step step)
        {
            object? answer = null;
            switch (step.Operation)
            {
                case 0:
                    var claim = Claim(record, Request(step), Now);
                    answer = claim.Result;
                    if (claim.Result.Outcome == ClaimOutcome.Acquired && claim.Next is not null)
                    {
                        Assert.True(claim.Result.Token!.Value.FencingToken > lastFence, "fencing tokens must rise");
                        lastFence = claim.Result.Token.Value.FencingToken;
                        issued.Add(claim.Result.Token.Value);
                        leaseEnds[claim.Result.Token.Value] = claim.Result.LeaseExpiresAt!.Value;
                    }

                    if (claim.Result.Outcome == ClaimOutcome.Completed)
                    {
                        Assert.Same(completed, claim.Result.Response);
                    }

                    record = claim.Next ?? record;
                    break;
                case 1 when Token(step) is { } token:
                    var complete = Complete(record, token, Responses[step.Variant], Now);
                    answer = complete.Result;
                    if (complete.Next is not null)
                    {
                        Assert.NotEqual(IdempotencyStatus.Completed, record.AsOf(Now).Status);
                        completed = complete.Next.Response;
                    }

                    record = complete.Next ?? record;
                    break;
                case 2 when Token(step) is { } token:
                    var renew = Renew(record, token, Lease, Now);
                    answer = renew.Result;
                    if (renew.Result)
                    {
                        leaseEnds[token] = Now + Lease;
                    }

                    record = renew.Next ?? record;
                    break;
                case 3:
                    var release = Release(record, Attempts[step.Attempt], Lease, Now);
                    answer = release.Result;
                    if (release.Result)
                    {
                        released.UnionWith(issued.Where(t => t.AttemptId == Attempts[step.Attempt]));
                    }

                    record = release.Next ?? record;
                    break;
                case 4:
                    Now += TimeSpan.FromSeconds(step.Seconds);
                    break;
            }

            CheckInvariants();
            return answer;
        }

        private void CheckInvariants()
        {
            var current = record.AsOf(Now);
            if (current.Status != IdempotencyStatus.Completed)
            {
                // Expired (or never completed): the next completion may store a new response.
                completed = current.Status == IdempotencyStatus.None ? null : completed;
            }

            // At most one holder of a valid claim: of every token ever issued, only the newest can complete, and only
            // while its lease (as last granted or renewed) runs and it has not been released; and then it can.
            var live = 0;
            foreach (var token in issued)
            {
                var valid = token == issued[^1] && !released.Contains(token) && Now < leaseEnds[token]
                    && current.Status == IdempotencyStatus.InProgress;
                var accepted = Complete(record, token, Responses[0], Now).Next is not null;
                Assert.True(valid == accepted, $"token {token.FencingToken}: valid={valid} but accepted={accepted}");
                live += accepted ? 1 : 0;
            }

            Assert.True(live <= 1, $"{live} tokens hold a valid claim at once");

            // A completed key replays the bytes it completed with, to every matching request, until it expires.
            if (current.Status == IdempotencyStatus.Completed)
            {
                Assert.Same(completed, current.Response);
                foreach (var fingerprint in Fingerprints)
                {
                    var replay = Claim(record, new ClaimRequest(Guid.NewGuid(), fingerprint, Lease, Retention), Now).Result;
                    Assert.True(replay.Outcome is ClaimOutcome.Completed or ClaimOutcome.Mismatch);
                    Assert.True(replay.Outcome == ClaimOutcome.Mismatch || ReferenceEquals(replay.Response, completed));
                }
            }
        }
    }
}
