using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Orleans.Storage;

namespace OrleansIdempotency.Grains.Tests;

[Collection(ClusterCollection.Name)]
public sealed class IdempotencyGrainTests(ClusterFixture fixture)
{
    private static readonly TimeSpan Lease = TimeSpan.FromSeconds(30);
    private static readonly TimeSpan Retention = TimeSpan.FromHours(24);
    private static readonly byte[] Request = [7, 7, 7];
    private static readonly StoredResponse Created = new(201, [new("Content-Type", "application/json")], "{\"ok\":true}"u8.ToArray(), false, 11);

    private static IdempotencyKey NewKey() => new("alice", Guid.NewGuid().ToString("N"));

    private IIdempotencyGrain Grain(IdempotencyKey key) => fixture.Grains.GetIdempotencyGrain(key);

    private static ClaimRequest Claim(Guid? attempt = null, byte[]? fingerprint = null, LapsedLeasePolicy policy = LapsedLeasePolicy.OutcomeUnknown) =>
        new(attempt ?? Guid.NewGuid(), fingerprint ?? Request, Lease, Retention, policy);

    [Fact]
    public async Task Claim_Complete_Replay_ReturnsTheStoredBytesToLaterCallers()
    {
        var grain = Grain(NewKey());

        var first = await grain.ClaimAsync(Claim());
        Assert.Equal(ClaimOutcome.Acquired, first.Outcome);
        Assert.True(await grain.CompleteAsync(first.Token!.Value, Created));

        var replay = await grain.ClaimAsync(Claim());
        Assert.Equal(ClaimOutcome.Completed, replay.Outcome);
        Assert.Equal(Created.Body, replay.Response!.Body);
        Assert.Equal(Created.Headers, replay.Response.Headers);
        Assert.Equal(201, replay.Response.StatusCode);
    }

    [Fact]
    public async Task Claim_SameAttemptAskingAgain_GetsItsClaimBack()
    {
        var grain = Grain(NewKey());
        var attempt = Guid.NewGuid();

        var first = await grain.ClaimAsync(Claim(attempt));
        var again = await grain.ClaimAsync(Claim(attempt));

        Assert.Equal(ClaimOutcome.Acquired, again.Outcome);
        Assert.Equal(first.Token, again.Token);
    }

    [Fact]
    public async Task Claim_DifferentRequestUnderTheSameKey_IsMismatch()
    {
        var grain = Grain(NewKey());
        await grain.ClaimAsync(Claim());

        var other = await grain.ClaimAsync(Claim(fingerprint: [9]));

        Assert.Equal(ClaimOutcome.Mismatch, other.Outcome);
    }

    [Fact]
    public async Task SameKeyInAnotherScope_IsAnIndependentKey()
    {
        var key = NewKey();
        var alice = await Grain(key).ClaimAsync(Claim());
        var bob = await Grain(key with { Scope = "bob" }).ClaimAsync(Claim(fingerprint: [9]));

        Assert.Equal(ClaimOutcome.Acquired, alice.Outcome);
        Assert.Equal(ClaimOutcome.Acquired, bob.Outcome);
    }

    [Fact]
    public async Task Release_LetsTheRetryClaimAgain()
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim());

        Assert.True(await grain.ReleaseAsync(first.Token!.Value.AttemptId, Lease));
        var retry = await grain.ClaimAsync(Claim());

        Assert.Equal(ClaimOutcome.Acquired, retry.Outcome);
        Assert.True(retry.Token!.Value.FencingToken > first.Token.Value.FencingToken);
        Assert.False(await grain.CompleteAsync(first.Token.Value, Created));
    }

    [Fact]
    public async Task Release_AfterTheClaimsWriteWasLost_FencesThatWriteOut_SoItCannotHoldTheKeyWhenItLands()
    {
        var grain = Grain(NewKey());
        var attempt = Guid.NewGuid();
        var lostWrite = fixture.Storage.LoseNextWrite(GrainId(grain));
        await Assert.ThrowsAsync<TimeoutException>(() => grain.ClaimAsync(Claim(attempt)));

        // The caller gave up and released; the attempt holds no claim, but its write is still on its way.
        Assert.False(await grain.ReleaseAsync(attempt, Lease));
        var land = await lostWrite.WaitAsync(TimeSpan.FromSeconds(10));

        await Assert.ThrowsAnyAsync<InconsistentStateException>(land);
        Assert.Equal(ClaimOutcome.Acquired, (await grain.ClaimAsync(Claim())).Outcome);
    }

    [Fact]
    public async Task TokenCalls_ThatACopySayingFreeWouldRefuse_ReadTheRecordFirst_AnotherActivationMayHoldTheClaim()
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim());
        Assert.True(await grain.ReleaseAsync(first.Token!.Value.AttemptId, Lease));

        // Another activation of the key (while membership changes) claims it: its write goes straight to storage, and
        // this activation's copy still says the key is free.
        var storage = fixture.Cluster.Silos[0].SiloHost.Services.GetRequiredKeyedService<IGrainStorage>("memory");
        var state = new GrainState<IdempotencyRecord>();
        await storage.ReadStateAsync(IdempotencyGrain.StateName, GrainId(grain), state);
        var (claimed, next) = IdempotencyTransitions.Claim(state.State!, Claim(), fixture.Time.GetUtcNow());
        state.State = next!;
        await storage.WriteStateAsync(IdempotencyGrain.StateName, GrainId(grain), state);
        var token = claimed.Token!.Value;

        Assert.True(await grain.RenewAsync(token, Lease));
        Assert.True(await grain.CompleteAsync(token, Created));
        Assert.Equal(ClaimOutcome.Completed, (await grain.ClaimAsync(Claim())).Outcome);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task ClaimAskedAgainAfterALostAnswer_ThatACopyWouldRefuse_ReadsTheRecordFirst_ItsClaimMayBeWrittenElsewhere(bool copyInDoubt)
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim());
        if (copyInDoubt)
        {
            fixture.Time.Advance(Lease);
            Assert.Equal(ClaimOutcome.OutcomeUnknown, (await grain.ClaimAsync(Claim())).Outcome);
        }

        // Another activation of the key (while membership changes) took the first attempt's release (it knew its action
        // had not run), then attempt A's claim, whose answer was lost: this activation's copy still shows the first.
        var storage = fixture.Cluster.Silos[0].SiloHost.Services.GetRequiredKeyedService<IGrainStorage>("memory");
        var state = new GrainState<IdempotencyRecord>();
        await storage.ReadStateAsync(IdempotencyGrain.StateName, GrainId(grain), state);
        state.State = IdempotencyTransitions.Release(state.State!, first.Token!.Value.AttemptId, Lease, fixture.Time.GetUtcNow()).Next!;
        var attempt = Claim();
        var (written, next) = IdempotencyTransitions.Claim(state.State, attempt, fixture.Time.GetUtcNow());
        state.State = next!;
        await storage.WriteStateAsync(IdempotencyGrain.StateName, GrainId(grain), state);

        // Asked again with the same attempt id: its claim, not the copy's "in progress" or "outcome unknown".
        var again = await grain.ClaimAsync(attempt with { MayHaveAskedBefore = true });

        Assert.Equal(ClaimOutcome.Acquired, again.Outcome);
        Assert.Equal(written.Token, again.Token);
        Assert.True(await grain.CompleteAsync(again.Token!.Value, Created));
    }

    [Fact]
    public async Task LapsedLease_BecomesOutcomeUnknown_AndTheLateCompletionIsRefused()
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim());
        fixture.Time.Advance(Lease);

        var next = await grain.ClaimAsync(Claim());
        var again = await grain.ClaimAsync(Claim());

        Assert.Equal(ClaimOutcome.OutcomeUnknown, next.Outcome);
        Assert.Equal(ClaimOutcome.OutcomeUnknown, again.Outcome);
        Assert.False(await grain.CompleteAsync(first.Token!.Value, Created));
        Assert.Equal(IdempotencyStatus.OutcomeUnknown, (await grain.GetAsync()).Status);
        // Its holder is gone and cannot say so: the grain that turned the lapse into an outcome does, once.
        AssertLapseLoggedOnce(grain, first.Token!.Value, "until an operator settles it");
    }

    [Fact]
    public async Task LapsedLease_WithReclaimPolicy_IsClaimedAgainAndTheStaleTokenRefused()
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim(policy: LapsedLeasePolicy.Reclaim));
        fixture.Time.Advance(Lease);

        var second = await grain.ClaimAsync(Claim(policy: LapsedLeasePolicy.Reclaim));

        Assert.Equal(ClaimOutcome.Acquired, second.Outcome);
        Assert.False(await grain.CompleteAsync(first.Token!.Value, Created));
        Assert.True(await grain.CompleteAsync(second.Token!.Value, Created));
        AssertLapseLoggedOnce(grain, first.Token!.Value, "the action may run twice");
    }

    [Fact]
    public async Task KeyPastItsRetention_WhoseLastClaimLapsed_IsClaimedAsNew_WithNoLapseLogged()
    {
        var grain = Grain(NewKey());
        await grain.ClaimAsync(Claim());
        fixture.Time.Advance(Retention + Lease);

        Assert.Equal(ClaimOutcome.Acquired, (await grain.ClaimAsync(Claim())).Outcome);
        Assert.Empty(LapseWarnings(grain));
    }

    private void AssertLapseLoggedOnce(IIdempotencyGrain grain, ClaimToken lapsed, string saying)
    {
        var logged = Assert.Single(LapseWarnings(grain));
        Assert.Contains(ClaimTokenText.Format(lapsed), logged, StringComparison.Ordinal);
        Assert.Contains(saying, logged, StringComparison.Ordinal);
    }

    // The grain's warnings of lapsed leases, for this key alone (the fixture's silos are shared).
    private List<string> LapseWarnings(IIdempotencyGrain grain) =>
        [.. fixture.Log.Collector.GetSnapshot()
            .Where(r => r.Level == LogLevel.Warning && r.Message.Contains(grain.GetPrimaryKeyString(), StringComparison.Ordinal) && r.Message.Contains("lapsed", StringComparison.Ordinal))
            .Select(r => r.Message)];

    [Fact]
    public async Task DuplicatesOfAKeyInProgress_ReadItAgainOncePerSecondAtMost_EvenWhenTheReadIsSlow()
    {
        var grain = Grain(NewKey());
        await grain.ClaimAsync(Claim());
        fixture.Time.Advance(IdempotencyGrain.UnsettledFreshness);
        fixture.Storage.DuringNextRead(GrainId(grain), () =>
        {
            fixture.Time.Advance(IdempotencyGrain.UnsettledFreshness * 1.5);
            return Task.CompletedTask;
        });
        var reads = fixture.Storage.For(GrainId(grain)).Reads;

        var duplicates = await Task.WhenAll(Enumerable.Range(0, 5).Select(_ => grain.ClaimAsync(Claim())));

        Assert.All(duplicates, d => Assert.Equal(ClaimOutcome.InProgress, d.Outcome));
        Assert.Equal(reads + 1, fixture.Storage.For(GrainId(grain)).Reads);
    }

    [Fact]
    public async Task Resolve_WhoseWriteLandedButWhoseAnswerWasLost_AskedAgain_AnswersSettled()
    {
        var grain = Grain(NewKey());
        var held = await grain.ClaimAsync(Claim());
        fixture.Time.Advance(Lease);
        var lostWrite = fixture.Storage.LoseNextWrite(GrainId(grain));
        await Assert.ThrowsAsync<TimeoutException>(() => grain.ResolveAsync(Created, held.Token));
        await (await lostWrite.WaitAsync(TimeSpan.FromSeconds(10)))();

        Assert.Equal(ResolveOutcome.Settled, await grain.ResolveAsync(Created, held.Token));
        Assert.Equal(Created.Body, (await grain.ClaimAsync(Claim())).Response!.Body);
    }

    [Fact]
    public async Task Resolve_SettlesAKeyInDoubt_WithTheKnownResponse_OrByFreeingIt_AndNothingElse()
    {
        var completed = Grain(NewKey());
        var freed = Grain(NewKey());
        var live = Grain(NewKey());
        await completed.ClaimAsync(Claim());
        await freed.ClaimAsync(Claim());
        fixture.Time.Advance(Lease);
        Assert.Equal(ClaimOutcome.OutcomeUnknown, (await completed.ClaimAsync(Claim())).Outcome);
        var held = await live.ClaimAsync(Claim());

        Assert.Equal(ResolveOutcome.Settled, await completed.ResolveAsync(Created, null));
        Assert.Equal(ResolveOutcome.Settled, await freed.ResolveAsync(null, null));
        Assert.Equal(ResolveOutcome.NotInDoubt, await live.ResolveAsync(Created, null));

        var replay = await completed.ClaimAsync(Claim());
        Assert.Equal(ClaimOutcome.Completed, replay.Outcome);
        Assert.Equal(Created.Body, replay.Response!.Body);
        Assert.Equal(ClaimOutcome.Acquired, (await freed.ClaimAsync(Claim())).Outcome);
        Assert.Equal(ClaimOutcome.InProgress, (await live.ClaimAsync(Claim())).Outcome);
        Assert.True(await live.CompleteAsync(held.Token!.Value, Created));
    }

    [Fact]
    public async Task Renew_KeepsALongActionsClaimAlive()
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim());
        fixture.Time.Advance(Lease / 2);
        Assert.True(await grain.RenewAsync(first.Token!.Value, Lease));
        fixture.Time.Advance(Lease / 2 + TimeSpan.FromSeconds(1));

        Assert.Equal(ClaimOutcome.InProgress, (await grain.ClaimAsync(Claim())).Outcome);
        Assert.True(await grain.CompleteAsync(first.Token.Value, Created));
    }

    [Fact]
    public async Task Wait_ReturnsWhenTheHolderCompletes_WithoutDelayingTheCompletion()
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim());

        var waiters = Enumerable.Range(0, 10).Select(_ => grain.WaitAsync(TimeSpan.FromSeconds(10))).ToArray();
        await Task.Delay(100);
        Assert.All(waiters, w => Assert.False(w.IsCompleted));

        // A non-interleaving wait would hold the grain for the whole timeout; on the fake clock that is forever.
        await grain.CompleteAsync(first.Token!.Value, Created).WaitAsync(TimeSpan.FromSeconds(10));
        await Task.WhenAll(waiters).WaitAsync(TimeSpan.FromSeconds(10));

        Assert.Equal(ClaimOutcome.Completed, (await grain.ClaimAsync(Claim())).Outcome);
    }

    [Fact]
    public async Task Wait_ReturnsWhenTheHolderReleases()
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim());
        var waiter = grain.WaitAsync(TimeSpan.FromSeconds(10));
        await Task.Delay(100);

        await grain.ReleaseAsync(first.Token!.Value.AttemptId, Lease);

        await waiter.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(ClaimOutcome.Acquired, (await grain.ClaimAsync(Claim())).Outcome);
    }

    [Fact]
    public async Task Wait_TimesOutOnTheClock_WhileTheKeyStaysInProgress()
    {
        var grain = Grain(NewKey());
        await grain.ClaimAsync(Claim());

        var waiter = grain.WaitAsync(TimeSpan.FromMilliseconds(500));
        await Task.Delay(100);
        Assert.False(waiter.IsCompleted);
        for (var i = 0; i < 4; i++)
        {
            fixture.Time.Advance(TimeSpan.FromMilliseconds(100));
            await Task.Delay(20);
        }

        Assert.False(waiter.IsCompleted, "the wait ended before its time-out");
        // By 800 ms at most, below the 1 s every wait ends by anyway: the time-out asked for is what ended it.
        await AdvanceUntilAsync(waiter, TimeSpan.FromMilliseconds(100), maxSteps: 4);

        Assert.Equal(ClaimOutcome.InProgress, (await grain.ClaimAsync(Claim())).Outcome);
    }

    [Fact]
    public async Task Wait_ReturnsAtTheLeasesEnd_SoTheWaiterSeesTheLapse()
    {
        var grain = Grain(NewKey());
        await grain.ClaimAsync(Claim());
        fixture.Time.Advance(Lease - TimeSpan.FromMilliseconds(300));

        var waiter = grain.WaitAsync(TimeSpan.FromMinutes(5));
        await Task.Delay(100);
        Assert.False(waiter.IsCompleted);
        await AdvanceUntilAsync(waiter, TimeSpan.FromMilliseconds(100), maxSteps: 5);

        Assert.Equal(ClaimOutcome.OutcomeUnknown, (await grain.ClaimAsync(Claim())).Outcome);
    }

    [Fact]
    public async Task Wait_NeverHoldsUpADeactivationLongerThanMaxWait_AndTheClaimSurvivesIt()
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim());
        var waiter = grain.WaitAsync(TimeSpan.FromSeconds(10));
        await Task.Delay(100);

        var deactivation = fixture.Cluster.DeactivateAsync(grain);
        await AdvanceUntilAsync(waiter, IdempotencyGrain.MaxWait, maxSteps: 1);
        await deactivation.WaitAsync(TimeSpan.FromSeconds(10));

        Assert.Equal(ClaimOutcome.InProgress, (await grain.ClaimAsync(Claim())).Outcome);
        Assert.True(await grain.CompleteAsync(first.Token!.Value, Created));
    }

    [Fact]
    public async Task Wait_OnAKeyThatIsNotInProgress_ReturnsAtOnce()
    {
        // New (never read), released and completed (each read by its activation): none has a holder to wait for. The
        // clock the wait is timed on does not move here, so a wait that began would never end.
        var fresh = Grain(NewKey());
        var released = Grain(NewKey());
        var releasedClaim = await released.ClaimAsync(Claim());
        Assert.True(await released.ReleaseAsync(releasedClaim.Token!.Value.AttemptId, Lease));
        var completed = Grain(NewKey());
        Assert.True(await completed.CompleteAsync((await completed.ClaimAsync(Claim())).Token!.Value, Created));
        Assert.Equal(IdempotencyStatus.Completed, (await completed.GetAsync()).Status);

        foreach (var grain in new[] { fresh, released, completed })
        {
            await grain.WaitAsync(TimeSpan.FromMinutes(1)).WaitAsync(TimeSpan.FromSeconds(10));
        }
    }

    [Fact]
    public async Task ExpiredRecord_BehavesAsAbsent()
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim());
        await grain.CompleteAsync(first.Token!.Value, Created);
        fixture.Time.Advance(Retention);

        Assert.Equal(IdempotencyStatus.None, (await grain.GetAsync()).Status);
        var again = await grain.ClaimAsync(Claim(fingerprint: [1]));

        Assert.Equal(ClaimOutcome.Acquired, again.Outcome);
    }

    [Fact]
    public async Task NewKey_IsClaimedWithOneWriteAndNoRead()
    {
        var key = NewKey();
        var grain = Grain(key);

        Assert.Equal(ClaimOutcome.Acquired, (await grain.ClaimAsync(Claim())).Outcome);

        Assert.Equal(new StorageCounts(Reads: 0, Writes: 1, Refused: 0), fixture.Storage.For(GrainId(grain)));
    }

    [Fact]
    public async Task ExistingKey_OnAFreshActivation_IsReadNotOverwritten()
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim());
        await grain.CompleteAsync(first.Token!.Value, Created);
        await fixture.Cluster.DeactivateAsync(grain);

        var replay = await grain.ClaimAsync(Claim());

        Assert.Equal(ClaimOutcome.Completed, replay.Outcome);
        Assert.Equal(Created.Body, replay.Response!.Body);
        // Claim and completion, then the fresh activation's create was refused and it read the record instead.
        Assert.Equal(new StorageCounts(Reads: 1, Writes: 2, Refused: 1), fixture.Storage.For(GrainId(grain)));
    }

    [Fact]
    public async Task Completion_OfAKeyNobodyElseAskedFor_FreesItsActivation()
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim());
        await grain.CompleteAsync(first.Token!.Value, Created);

        // Its replay then reads the record: ExistingKey_OnAFreshActivation_IsReadNotOverwritten.
        await WaitUntilNotActivatedAsync(grain);
    }

    [Fact]
    public async Task Completion_OfAKeyWhoseDuplicateArrivedWhileItRan_KeepsItsActivationForTheRetries()
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim());
        Assert.Equal(ClaimOutcome.InProgress, (await grain.ClaimAsync(Claim())).Outcome);
        await grain.CompleteAsync(first.Token!.Value, Created);

        // Long enough for a deactivation requested on completion to have happened (the other test sees it in ms).
        await Task.Delay(TimeSpan.FromSeconds(1));
        Assert.Equal(1, await ActivationsOf(grain));
        var replay = await grain.ClaimAsync(Claim());

        Assert.Equal(ClaimOutcome.Completed, replay.Outcome);
        Assert.Equal(new StorageCounts(Reads: 0, Writes: 2, Refused: 0), fixture.Storage.For(GrainId(grain)));
    }

    [Fact]
    public async Task Duplicate_QueuedBehindTheCompletionWrite_GetsTheReplay()
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim());
        var writing = new TaskCompletionSource();
        var release = new TaskCompletionSource();
        fixture.Storage.BeforeNextWrite(GrainId(grain), async () =>
        {
            writing.SetResult();
            await release.Task;
        });

        var completion = grain.CompleteAsync(first.Token!.Value, Created);
        await writing.Task.WaitAsync(TimeSpan.FromSeconds(10));
        // Queued behind the completion: its answer comes from this activation or, once it is gone, the next one.
        var duplicate = grain.ClaimAsync(Claim());
        release.SetResult();

        Assert.True(await completion);
        var replay = await duplicate;
        Assert.Equal(ClaimOutcome.Completed, replay.Outcome);
        Assert.Equal(Created.Body, replay.Response!.Body);
    }

    [Fact]
    public async Task Completion_AskedAgainAfterItsActivationWasFreed_IsAcknowledgedWithoutAnotherWrite()
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim());
        Assert.True(await grain.CompleteAsync(first.Token!.Value, Created));
        await WaitUntilNotActivatedAsync(grain);

        // The caller lost the first answer and asks again with the same claim.
        Assert.True(await grain.CompleteAsync(first.Token!.Value, Created));

        Assert.Equal(new StorageCounts(Reads: 1, Writes: 2, Refused: 0), fixture.Storage.For(GrainId(grain)));
    }

    [Fact]
    public async Task InProgressKey_OnAFreshActivation_IsNotClaimedAgain()
    {
        var grain = Grain(NewKey());
        var first = await grain.ClaimAsync(Claim());
        await fixture.Cluster.DeactivateAsync(grain);

        Assert.Equal(ClaimOutcome.InProgress, (await grain.ClaimAsync(Claim())).Outcome);
        Assert.True(await grain.CompleteAsync(first.Token!.Value, Created));
    }

    [Fact]
    public async Task ClaimWhoseWriteWasStuckPastTheCallersPatience_IsNotDecidedAgainForNobody()
    {
        var grain = Grain(NewKey());
        // The write hangs (storage unreachable) until the caller has given up, then storage refuses it, as
        // PostgreSQL refuses a claim that arrives after its lease ended.
        fixture.Storage.BeforeNextWrite(GrainId(grain), () =>
        {
            fixture.Time.Advance(TimeSpan.FromSeconds(6));
            throw new InconsistentStateException("refused: arrived too late");
        });

        await Assert.ThrowsAsync<TimeoutException>(() => grain.ClaimAsync(Claim()));

        Assert.Equal(new StorageCounts(Reads: 0, Writes: 0, Refused: 1), fixture.Storage.For(GrainId(grain)));
        Assert.Equal(ClaimOutcome.Acquired, (await grain.ClaimAsync(Claim())).Outcome);
    }

    private static GrainId GrainId(IIdempotencyGrain grain) => ((GrainReference)grain).GrainId;

    private Task<int> ActivationsOf(IIdempotencyGrain grain) =>
        fixture.Grains.GetGrain<IManagementGrain>(0).GetGrainActivationCount((GrainReference)grain);

    private async Task WaitUntilNotActivatedAsync(IIdempotencyGrain grain)
    {
        for (var deadline = DateTime.UtcNow.AddSeconds(10); await ActivationsOf(grain) != 0; await Task.Delay(20))
        {
            Assert.True(DateTime.UtcNow < deadline, "The key was still activated after 10 s.");
        }
    }

    private async Task AdvanceUntilAsync(Task task, TimeSpan step, int maxSteps = 100)
    {
        for (var i = 0; i < maxSteps && !task.IsCompleted; i++)
        {
            fixture.Time.Advance(step);
            await Task.WhenAny(task, Task.Delay(20));
        }

        await task.WaitAsync(TimeSpan.FromSeconds(10));
    }
}
