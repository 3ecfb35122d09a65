using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Diagnostics.Metrics.Testing;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Testing;
using Microsoft.Extensions.Time.Testing;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore.Tests;

/// <summary>
/// The writes a request could not get through to the store: how long a completion may wait (its lease), and how
/// many writes wait at most, each kind bounded apart.
/// </summary>
[Collection(MiddlewareClusterCollection.Name)]
public sealed class BackgroundWritesTests(MiddlewareClusterFixture fixture)
{
    private static readonly DateTimeOffset Never = DateTimeOffset.MaxValue;

    private static readonly TimeSpan Lease = IdempotencyPolicy.Default.Lease;

    [Fact]
    public async Task CompletionThatCannotReachTheStoreForItsWholeLease_IsGivenUp_AndItsKeyIsInDoubt_NotRunAgain()
    {
        var (harness, key, log, running, first) = await RunningAsync();
        using var requests = Requests(harness);

        await fixture.WhileStoreDownAsync(async () =>
        {
            running.SetResult();
            Assert.Equal(201, (await first).Response.StatusCode);
            await MiddlewareHarness.WaitUntilAsync(() => Task.FromResult(harness.Calls.WaitingForTheStore == 1));
            await fixture.RunClockAsync(Lease + TimeSpan.FromSeconds(2));
            await fixture.ClockRunsUntilAsync(() => Errors(log, key).Count > 0);
            return true;
        });

        await AssertInDoubtAsync(harness, key, log, "whole lease", "was refused");
        AssertCounted(requests, ("in_doubt", 1), ("rejected", 1));
    }

    [Fact]
    public async Task CompletionThatReachesTheStoreAfterTheGrainsLeaseEnded_IsRefused_AndItsKeyIsInDoubt_NotRunAgain()
    {
        var (harness, key, log, running, first) = await RunningAsync();
        using var requests = Requests(harness);

        await fixture.WhileStoreDownAsync(async () =>
        {
            // Three quarters of a lease in, with no renewal landing, the action ends: its completion may wait until a
            // lease from now, but the grain's lease, which began at the claim, ends a quarter of a lease from now.
            await fixture.RunClockAsync(Lease * 3 / 4);
            running.SetResult();
            Assert.Equal(201, (await first).Response.StatusCode);
            await MiddlewareHarness.WaitUntilAsync(() => Task.FromResult(harness.Calls.WaitingForTheStore == 1));
            await fixture.RunClockAsync(Lease / 4 + TimeSpan.FromSeconds(2));
            return true;
        });

        // Once back, the store has the completion before the lease it would be given up at.
        await fixture.ClockRunsUntilAsync(() => Errors(log, key).Count > 0);
        await AssertInDoubtAsync(harness, key, log, "was refused", "whole lease");
        AssertCounted(requests, ("in_doubt", 1), ("rejected", 1));
    }

    [Fact]
    public async Task CompletionThatLandsOnceTheStoreIsBack_IsCountedExecuted_WhenItLands_NotBefore_AndWaitsInTheGaugeTillThen()
    {
        var (harness, key, _, running, first) = await RunningAsync();
        using var requests = Requests(harness);
        using var waiting = new MetricCollector<int>(harness.Meters, IdempotencyMetrics.MeterName, "idempotency.writes.waiting");

        await fixture.WhileStoreDownAsync(async () =>
        {
            running.SetResult();
            Assert.Equal(201, (await first).Response.StatusCode);
            await MiddlewareHarness.WaitUntilAsync(() => Task.FromResult(harness.Calls.WaitingForTheStore == 1));
            return true;
        });
        Assert.Empty(requests.GetMeasurementSnapshot());
        waiting.RecordObservableInstruments();
        Assert.Equal(1, waiting.LastMeasurement!.Value);

        await fixture.ClockRunsUntilAsync(() => requests.GetMeasurementSnapshot().Count > 0);
        AssertCounted(requests, ("executed", 1));
        waiting.RecordObservableInstruments();
        Assert.Equal(0, waiting.LastMeasurement!.Value);
        Assert.Equal("true", (await harness.SendAsync(key)).Response.Headers["Idempotent-Replayed"]);
    }

    [Fact]
    public async Task CompletionsRefusedAtTheirBound_LeftWaitingAtShutdown_OrAddedAfterIt_AreEachSettledOnceAsNotTaken()
    {
        var settled = new System.Collections.Concurrent.ConcurrentQueue<bool>();
        var writes = new BackgroundWrites(new FakeTimeProvider(), new FakeLogger());

        writes.AddCompletion(Grain(), NeverLands, BackgroundWrites.MaxCompletionBytes + 1, Never, settled.Enqueue);
        Assert.Equal([false], settled);
        writes.AddCompletion(Grain(), NeverLands, 10, Never, settled.Enqueue);
        writes.Dispose();
        writes.AddCompletion(Grain(), NeverLands, 10, Never, settled.Enqueue);

        await MiddlewareHarness.WaitUntilAsync(() => Task.FromResult(settled.Count >= 3));
        await Task.Delay(100);
        Assert.Equal([false, false, false], settled);
    }

    [Fact]
    public async Task ReleasesBeyondTheirBound_CountingOneBeingTried_AreGivenUpAtOnce_AndLogged()
    {
        var log = new FakeLogger();
        using var writes = new BackgroundWrites(new FakeTimeProvider(), log);
        var tried = new TaskCompletionSource();
        var failing = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
        writes.AddRelease(Grain(), _ =>
        {
            tried.TrySetResult();
            return failing.Task;
        }, Never);
        await tried.Task;

        // The first is out being tried as the others arrive; its try fails and queues it again behind them.
        var one = Grain();
        for (var i = 1; i < BackgroundWrites.MaxReleases; i++)
        {
            writes.AddRelease(one, NeverLands, Never);
        }

        var beyond = Grain();
        writes.AddRelease(beyond, NeverLands, Never);
        failing.SetException(new IOException("The store is down."));

        await MiddlewareHarness.WaitUntilAsync(() => Task.FromResult(writes.Waiting == BackgroundWrites.MaxReleases));
        Assert.Contains(Errors(log, beyond.GetPrimaryKeyString()), message => message.Contains("too many writes"));
    }

    [Fact]
    public void CompletionsBeyondTheirBytes_AreGivenUpAtOnce_WhileReleasesFillTheirOwnBound()
    {
        var log = new FakeLogger();
        using var writes = new BackgroundWrites(new FakeTimeProvider(), log);
        var released = Grain();
        for (var i = 0; i < BackgroundWrites.MaxReleases; i++)
        {
            writes.AddRelease(released, NeverLands, Never);
        }

        var releaseBeyond = Grain();
        writes.AddRelease(releaseBeyond, NeverLands, Never);
        Assert.Contains(Errors(log, releaseBeyond.GetPrimaryKeyString()), message => message.Contains("too many writes"));

        var nearlyAll = Grain();
        var beyond = Grain();
        var theRest = Grain();
        writes.AddCompletion(nearlyAll, NeverLands, BackgroundWrites.MaxCompletionBytes - 100, Never);
        writes.AddCompletion(beyond, NeverLands, 101, Never);
        writes.AddCompletion(theRest, NeverLands, 100, Never);

        Assert.Empty(Errors(log, nearlyAll.GetPrimaryKeyString()));
        Assert.Contains(Errors(log, beyond.GetPrimaryKeyString()), message => message.Contains("too many writes"));
        Assert.Empty(Errors(log, theRest.GetPrimaryKeyString()));
    }

    [Fact]
    public async Task WriteWhoseFailureCannotBeLogged_IsTriedAgain_NotLost()
    {
        var time = new FakeTimeProvider();
        using var writes = new BackgroundWrites(time, new FailingLog("a background write failed"));
        var tries = 0;
        writes.AddRelease(Grain(), _ => Interlocked.Increment(ref tries) == 1 ? NeverLands(null!) : Task.FromResult(true), Never);

        await MiddlewareHarness.WaitUntilAsync(() =>
        {
            time.Advance(TimeSpan.FromMilliseconds(200));
            return Task.FromResult(Volatile.Read(ref tries) == 2 && writes.Waiting == 0);
        });
    }

    [Fact]
    public async Task WriteGivenUpWhoseLogCannotBeWritten_DoesNotHoldBackTheWriteTakenWithIt()
    {
        var time = new FakeTimeProvider();
        using var writes = new BackgroundWrites(time, new FailingLog("whole lease"));
        var laterTries = 0;
        writes.AddCompletion(Grain(), NeverLands, 1, time.GetUtcNow() + TimeSpan.FromSeconds(1));
        writes.AddRelease(Grain(), _ => Interlocked.Increment(ref laterTries) == 1 ? NeverLands(null!) : Task.FromResult(true), Never);
        writes.AddRelease(Grain(), _ => Task.FromResult(true), Never);

        // The third lands at once, so the next round is a batch, not a probe of one: past the completion's lease, it
        // gives the completion up (a log that cannot be written) as it takes the release that failed.
        await MiddlewareHarness.WaitUntilAsync(() =>
        {
            time.Advance(TimeSpan.FromMilliseconds(500));
            return Task.FromResult(Volatile.Read(ref laterTries) == 2);
        });
    }

    [Fact]
    public async Task CompletionRefusedWhoseRefusalCannotBeLogged_IsNotTriedAgain()
    {
        var time = new FakeTimeProvider();
        using var writes = new BackgroundWrites(time, new FailingLog("was refused"));
        var tries = 0;
        writes.AddCompletion(Grain(), _ =>
        {
            Interlocked.Increment(ref tries);
            return Task.FromResult(false);
        }, 1, Never);

        await MiddlewareHarness.WaitUntilAsync(() => Task.FromResult(writes.Waiting == 0 && Volatile.Read(ref tries) == 1));
        for (var i = 0; i < 10; i++)
        {
            time.Advance(TimeSpan.FromSeconds(1));
            await Task.Delay(20);
        }

        Assert.Equal(1, Volatile.Read(ref tries));
    }

    [Fact]
    public async Task WritesFillingTheirBound_WhenTheirDrainDied_AreDrainedAgainAfterAPause_WithoutAWriteAddedToStartIt()
    {
        var time = new FakeTimeProvider();
        var log = new FailingLog("whole lease");
        using var writes = new BackgroundWrites(time, log);
        var storeUp = false;
        Task<bool> Release(IIdempotencyGrain grain) => Volatile.Read(ref storeUp) ? Task.FromResult(true) : NeverLands(grain);

        writes.AddCompletion(Grain(), NeverLands, 1, time.GetUtcNow() + TimeSpan.FromSeconds(1));
        var released = Grain();
        for (var i = 0; i < BackgroundWrites.MaxReleases; i++)
        {
            writes.AddRelease(released, Release, Never);
        }

        // Past its lease the completion is given up, and the log that cannot say so ends the drain, the releases held.
        await MiddlewareHarness.WaitUntilAsync(() =>
        {
            time.Advance(TimeSpan.FromMilliseconds(500));
            return Task.FromResult(log.Written.Any(message => message.Contains("stopped draining")));
        });
        Assert.Equal(BackgroundWrites.MaxReleases, writes.Held);

        // No write added has to start it again (before, the releases waited for one, which may never come).
        Volatile.Write(ref storeUp, true);
        await MiddlewareHarness.WaitUntilAsync(() =>
        {
            time.Advance(TimeSpan.FromMilliseconds(500));
            return Task.FromResult(writes.Held == 0);
        });
    }

    // A key whose action runs until the returned source completes, with the log of the writes that wait for the store.
    private async Task<(MiddlewareHarness Harness, string Key, FakeLogger Log, TaskCompletionSource Running, Task<HttpContext> First)> RunningAsync()
    {
        var log = new FakeLogger<IdempotencyGrainCalls>();
        var running = new TaskCompletionSource();
        var harness = new MiddlewareHarness(fixture, MiddlewareHarness.CreatesAfter(running.Task), callsLog: log);
        var key = MiddlewareHarness.NewKey();
        var first = harness.SendAsync(key);
        await MiddlewareHarness.WaitUntilAsync(() => Task.FromResult(harness.Executions == 1));
        return (harness, key, log, running, first);
    }

    // The key's retry finds its outcome unknown, the action having run once, and the log says why, once.
    private static async Task AssertInDoubtAsync(MiddlewareHarness harness, string key, FakeLogger log, string why, string notWhy)
    {
        Assert.Equal(409, (await harness.SendAsync(key)).Response.StatusCode);
        Assert.Equal(1, harness.Executions);
        var errors = Errors(log, key);
        Assert.Contains(errors, message => message.Contains(why));
        Assert.DoesNotContain(errors, message => message.Contains(notWhy));
    }

    private static MetricCollector<long> Requests(MiddlewareHarness harness) =>
        new(harness.Meters, IdempotencyMetrics.MeterName, "idempotency.requests");

    private static void AssertCounted(MetricCollector<long> requests, params (string Result, long Count)[] expected) =>
        Assert.Equal(
            expected.ToDictionary(e => e.Result, e => e.Count),
            requests.GetMeasurementSnapshot().GroupBy(m => (string)m.Tags["result"]!).ToDictionary(g => g.Key, g => g.Sum(m => m.Value)));

    private static Task<bool> NeverLands(IIdempotencyGrain grain) => Task.FromException<bool>(new IOException("The store is down."));

    private static List<string> Errors(FakeLogger log, string key) =>
        [.. log.Collector.GetSnapshot().Where(r => r.Level == LogLevel.Error && r.Message.Contains(key)).Select(r => r.Message)];

    private IIdempotencyGrain Grain() => fixture.Grains.GetIdempotencyGrain(new IdempotencyKey("user:alice", MiddlewareHarness.NewKey()));
}
