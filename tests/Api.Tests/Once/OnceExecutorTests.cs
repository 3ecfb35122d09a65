using System.Diagnostics.Metrics;
using System.Text.Json;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Diagnostics.Metrics.Testing;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Logging.Testing;
using Microsoft.Extensions.Options;
using OrleansIdempotency.AspNetCore;
using OrleansIdempotency.AspNetCore.Tests;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Once;

namespace OrleansIdempotency.Api.Tests.Once;

/// <summary><see cref="IOnceExecutor"/> on an in-process cluster with a switchable store and a fake clock.</summary>
[Collection(MiddlewareClusterCollection.Name)]
public sealed class OnceExecutorTests(MiddlewareClusterFixture fixture)
{
    private int runs;

    private OnceExecutor Executor(Func<Exception, bool>? releasesOnException = null, IMeterFactory? meters = null, ILogger<OnceExecutor>? log = null, TimeProvider? time = null)
    {
        var options = MiddlewareClusterFixture.Options();
        options.Value.OnceReleasesOnException = releasesOnException ?? options.Value.OnceReleasesOnException;
        var calls = fixture.Calls(options);
        return new OnceExecutor(
            calls,
            options,
            new IdempotencyMetrics(meters ?? new ServiceCollection().AddMetrics().BuildServiceProvider().GetRequiredService<IMeterFactory>(), calls),
            time ?? fixture.Time,
            log ?? NullLogger<OnceExecutor>.Instance);
    }

    [Fact]
    public async Task EachExecution_IsCountedOnce_ByHowItEnded()
    {
        var meters = new ServiceCollection().AddMetrics().BuildServiceProvider().GetRequiredService<IMeterFactory>();
        var once = Executor(meters: meters);
        using var calls = new MetricCollector<long>(meters, IdempotencyMetrics.MeterName, "idempotency.once.calls");
        var key = new OnceKey(NewKey(), Input: "charge 5");

        await once.ExecuteOnceAsync(key, ChargeAsync);
        await once.ExecuteOnceAsync(key, ChargeAsync);
        await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(key with { Input = "charge 6" }, ChargeAsync));
        await Assert.ThrowsAsync<InvalidOperationException>(() => once.ExecuteOnceAsync(NewKey(), Task<Charge> (_) => throw new InvalidOperationException("declined")));
        await fixture.WhileStoreDownAsync(() => Assert.ThrowsAsync<IdempotencyUnavailableException>(() => once.ExecuteOnceAsync(NewKey(), ChargeAsync)));
        using var cancelling = new CancellationTokenSource();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => once.ExecuteOnceAsync(NewKey(), async ct =>
        {
            await cancelling.CancelAsync();
            ct.ThrowIfCancellationRequested();
            return new Charge(Guid.NewGuid(), 1m);
        }, cancelling.Token));

        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => once.ExecuteOnceAsync(NewKey(), ChargeAsync, cancelling.Token));

        Assert.All(calls.GetMeasurementSnapshot(), m => Assert.Equal("execute", m.Tags["operation"]));
        Assert.Equal(
            new Dictionary<string, long>
            {
                ["executed"] = 1, ["replayed"] = 1, ["key-reused"] = 1, ["released"] = 1, ["store-unavailable"] = 1, ["in_doubt"] = 1, ["abandoned"] = 1,
            },
            calls.GetMeasurementSnapshot().GroupBy(m => (string)m.Tags["result"]!).ToDictionary(g => g.Key, g => g.Sum(m => m.Value)));
    }

    private static string NewKey() => Guid.NewGuid().ToString();

    private Task<Charge> ChargeAsync(CancellationToken _)
    {
        Interlocked.Increment(ref runs);
        return Task.FromResult(new Charge(Guid.NewGuid(), 5.00m));
    }

    [Fact]
    public async Task ExecutionWhoseCompletionWaitsForTheStore_IsCountedExecuted_OnceItLands()
    {
        var meters = new ServiceCollection().AddMetrics().BuildServiceProvider().GetRequiredService<IMeterFactory>();
        var once = Executor(meters: meters);
        using var calls = new MetricCollector<long>(meters, IdempotencyMetrics.MeterName, "idempotency.once.calls");
        var key = NewKey();

        try
        {
            await once.ExecuteOnceAsync(key, async ct =>
            {
                fixture.Store.Down = true;
                return await ChargeAsync(ct);
            });
            Assert.Empty(calls.GetMeasurementSnapshot());
        }
        finally
        {
            fixture.Store.Down = false;
        }

        await fixture.ClockRunsUntilAsync(() => calls.GetMeasurementSnapshot().Count > 0);
        var counted = Assert.Single(calls.GetMeasurementSnapshot());
        Assert.Equal("executed", counted.Tags["result"]);
        Assert.Equal(1, runs);
    }

    [Fact]
    public async Task ExecuteOnce_RunsTheActionOnce_AndLaterCallsGetItsStoredResult()
    {
        var once = Executor();
        var key = NewKey();

        var first = await once.ExecuteOnceAsync(key, ChargeAsync);
        var again = await once.ExecuteOnceAsync(key, ChargeAsync);

        Assert.Equal(first, again);
        Assert.Equal(1, runs);
    }

    [Fact]
    public async Task ParallelCallsWithOneKey_RunTheActionOnce_AndAllGetItsResult()
    {
        var once = Executor();
        for (var round = 0; round < 3; round++)
        {
            var key = NewKey();
            var release = new TaskCompletionSource();
            var calls = Enumerable.Range(0, 50).Select(_ => Task.Run(() => once.ExecuteOnceAsync(key, async ct =>
            {
                await release.Task;
                return await ChargeAsync(ct);
            }))).ToArray();
            while (await fixture.Grains.GetIdempotencyGrain(OnceExecutor.GrainKey("default", key)).GetAsync() is { Status: not IdempotencyStatus.InProgress })
            {
                await Task.Delay(5);
            }

            release.SetResult();
            var results = await Task.WhenAll(calls);

            Assert.Single(results.Distinct());
            Assert.Equal(round + 1, runs);
        }
    }

    [Fact]
    public async Task CallWhileTheKeyRunsElsewhere_PastTheWait_IsRefusedAsInProgress_AndDoesNotRun()
    {
        var once = Executor();
        var key = NewKey();
        var release = new TaskCompletionSource();
        var first = once.ExecuteOnceAsync(key, async ct =>
        {
            await release.Task;
            return await ChargeAsync(ct);
        });
        await MiddlewareHarness.WaitUntilAsync(async () =>
            await fixture.Grains.GetIdempotencyGrain(OnceExecutor.GrainKey("default", key)).GetAsync() is { Status: IdempotencyStatus.InProgress });

        // It waits (the clock standing still) for the key, and is refused only once the wait is over.
        var waitStarted = fixture.Time.GetUtcNow();
        var second = once.ExecuteOnceAsync(key, ChargeAsync);
        await Task.Delay(300);
        Assert.False(second.IsCompleted, "The call was refused without waiting for the key.");
        await fixture.ClockRunsUntilAsync(() => second.IsCompleted);
        Assert.True(fixture.Time.GetUtcNow() - waitStarted >= IdempotencyPolicy.Default.WaitTimeout, "Refused before its wait was over.");
        var refused = await Assert.ThrowsAsync<OnceRefusedException>(() => second);
        release.SetResult();
        await first;

        Assert.Equal(OnceRefusal.InProgress, refused.Reason);
        Assert.Equal(1, runs);
    }

    [Fact]
    public async Task SameKeyWithAnotherInput_IsRefusedAsKeyReused_AndNothingRuns()
    {
        var once = Executor();
        var key = NewKey();
        await once.ExecuteOnceAsync(new OnceKey(key, Input: "{\"amount\":5}"), ChargeAsync);

        var refused = await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(new OnceKey(key, Input: "{\"amount\":6}"), ChargeAsync));

        Assert.Equal(OnceRefusal.KeyReused, refused.Reason);
        Assert.Equal(1, runs);
    }

    [Fact]
    public async Task InputsThatDifferOnlyInALoneSurrogate_AreDifferentInputs()
    {
        var once = Executor();
        var key = NewKey();
        await once.ExecuteOnceAsync(new OnceKey(key, Input: "x\uD800"), ChargeAsync);

        var refused = await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(new OnceKey(key, Input: "x\uDBFF"), ChargeAsync));

        Assert.Equal(OnceRefusal.KeyReused, refused.Reason);
        Assert.Equal(1, runs);
    }

    [Fact]
    public async Task InputWithALoneSurrogate_NeverSharesAFingerprintWithAnotherInput()
    {
        // The UTF-16 of the first is the UTF-8 of the second: 00 D8 80 00.
        var once = Executor();
        var key = NewKey();
        await once.ExecuteOnceAsync(new OnceKey(key, Input: "\uD800\u0080"), ChargeAsync);

        var refused = await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(new OnceKey(key, Input: "\u0000\u0600\u0000"), ChargeAsync));

        Assert.Equal(OnceRefusal.KeyReused, refused.Reason);
    }

    [Theory]
    [InlineData('k', 256, -1)]
    [InlineData('\u20ac', 86, -1)]
    [InlineData('k', 8, 0)]
    [InlineData('k', 8, 0xD800)]
    public async Task KeyNoGrainKeyHoldsAsItIs_IsRefusedAsAnArgument_AndNothingRuns(char fill, int count, int last)
    {
        // A character code, not a string: an attribute's strings are stored as UTF-8, which has no lone surrogate.
        var key = new string(fill, count) + (last < 0 ? "" : ((char)last).ToString());

        await Assert.ThrowsAsync<ArgumentException>(() => Executor().ExecuteOnceAsync(new OnceKey(key), ChargeAsync));

        Assert.Equal(0, runs);
    }

    [Fact]
    public async Task KeyOf255Utf8Bytes_IsTaken()
    {
        await Executor().ExecuteOnceAsync(new OnceKey(new string('\u20ac', 73) + Guid.NewGuid()), ChargeAsync);

        Assert.Equal(1, runs);
    }

    [Fact]
    public async Task KeysOfDifferentScopes_NeverMeet_NorTheKeysOfIdempotentEndpoints()
    {
        var once = Executor();
        var key = NewKey();

        var a = await once.ExecuteOnceAsync(new OnceKey(key, "tenant-a"), ChargeAsync);
        var b = await once.ExecuteOnceAsync(new OnceKey(key, "tenant-b"), ChargeAsync);

        Assert.NotEqual(a, b);
        Assert.Equal(2, runs);
        Assert.NotEqual("user:alice", OnceExecutor.GrainKey("user:alice", key).Scope);
        Assert.NotEqual(OnceExecutor.HttpGrainKey("user:alice", key), OnceExecutor.GrainKey("user:alice", key));
    }

    [Fact]
    public async Task ActionThatThrows_ReleasesTheKey_SoTheNextCallRunsIt()
    {
        var once = Executor();
        var key = NewKey();

        await Assert.ThrowsAsync<TimeoutException>(() => once.ExecuteOnceAsync<Charge>(key, _ => throw new TimeoutException("downstream")));
        var retried = await once.ExecuteOnceAsync(key, ChargeAsync);

        Assert.Equal(1, runs);
        Assert.Equal(retried, await once.ExecuteOnceAsync(key, ChargeAsync));
    }

    [Fact]
    public async Task ExceptionTheOptionsKeep_LeavesTheKeyInDoubt_AndOthersStillReleaseIt()
    {
        // A downstream time-out: the refund may have gone through.
        var once = Executor(releasesOnException: ex => ex is not TimeoutException);
        var timedOut = NewKey();
        var declined = NewKey();

        await Assert.ThrowsAsync<TimeoutException>(() => once.ExecuteOnceAsync<Charge>(timedOut, _ => throw new TimeoutException("downstream")));
        await Assert.ThrowsAsync<InvalidOperationException>(() => once.ExecuteOnceAsync<Charge>(declined, _ => throw new InvalidOperationException("declined")));
        fixture.Time.Advance(IdempotencyPolicy.Default.Lease);

        var refused = await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(timedOut, ChargeAsync));
        Assert.Equal(OnceRefusal.OutcomeUnknown, refused.Reason);
        await once.ExecuteOnceAsync(declined, ChargeAsync);
        Assert.Equal(1, runs);
    }

    [Fact]
    public async Task OptionsThatThrowOnAnException_LeaveTheKeyInDoubt_AndTheCallerGetsTheActionsException_Counted()
    {
        var meters = new ServiceCollection().AddMetrics().BuildServiceProvider().GetRequiredService<IMeterFactory>();
        using var calls = new MetricCollector<long>(meters, IdempotencyMetrics.MeterName, "idempotency.once.calls");
        var log = new FakeLogger<OnceExecutor>();
        var once = Executor(releasesOnException: _ => throw new NotImplementedException("a predicate with a bug"), meters: meters, log: log);
        var key = NewKey();

        await Assert.ThrowsAsync<TimeoutException>(() => once.ExecuteOnceAsync<Charge>(key, _ => throw new TimeoutException("downstream")));
        fixture.Time.Advance(IdempotencyPolicy.Default.Lease);

        Assert.Equal(OnceRefusal.OutcomeUnknown, (await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(key, ChargeAsync))).Reason);
        Assert.Equal(0, runs);
        Assert.Contains(calls.GetMeasurementSnapshot(), m => Equals(m.Tags["result"], "in_doubt"));
        Assert.Contains(log.Collector.GetSnapshot(), r => r.Level == LogLevel.Error && r.Exception is NotImplementedException);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task ActionCancelledByItsCaller_LeavesTheKeyInDoubt_AndItIsNeverRunAgain_WhateverItThrows(bool throwsItsOwnKind)
    {
        // A gRPC call cut off throws RpcException(Cancelled), SqlClient a SqlException: not OperationCanceledException.
        var once = Executor();
        var key = NewKey();
        using var cancel = new CancellationTokenSource();

        await Assert.ThrowsAnyAsync<Exception>(() => once.ExecuteOnceAsync<Charge>(key, async ct =>
        {
            Interlocked.Increment(ref runs);
            await cancel.CancelAsync();
            return throwsItsOwnKind ? throw new InvalidOperationException("the call was cancelled") : throw new OperationCanceledException(ct);
        }, cancel.Token));
        fixture.Time.Advance(IdempotencyPolicy.Default.Lease);
        var refused = await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(key, ChargeAsync));

        Assert.Equal(OnceRefusal.OutcomeUnknown, refused.Reason);
        Assert.Equal(1, runs);
    }

    [Fact]
    public async Task CallerCancelledBeforeTheAction_RunsNothing_AndLeavesTheKeyFreeForTheNextCall()
    {
        // Cancelled before the call, and cancelled while its claim was being written (a worker's host stopping).
        var once = Executor();
        var before = NewKey();
        var during = NewKey();
        using var cancelled = new CancellationTokenSource();
        await cancelled.CancelAsync();
        using var cancelling = new CancellationTokenSource();
        fixture.Store.BeforeNextWrite(fixture.Grains.GetIdempotencyGrain(OnceExecutor.GrainKey("default", during)).GetGrainId(), () => cancelling.CancelAsync());

        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => once.ExecuteOnceAsync(before, ChargeAsync, cancelled.Token));
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => once.ExecuteOnceAsync(during, ChargeAsync, cancelling.Token));
        Assert.Equal(0, runs);

        // No lease has to lapse: the claim made for the leaving caller was given back.
        await once.ExecuteOnceAsync(before, ChargeAsync);
        await once.ExecuteOnceAsync(during, ChargeAsync);
        Assert.Equal(2, runs);
    }

    [Fact]
    public async Task CallerCancelledAfterItsClaimWasAnsweredBeforeTheActionBegan_GivesTheKeyBack_AndRunsNothing()
    {
        // The lease's renewal is set up between the claim's answer and the action: the caller cancels right there.
        using var cancelling = new CancellationTokenSource();
        var once = Executor(time: new CancellingAtFirstTimer(fixture.Time, cancelling));
        var key = NewKey();

        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => once.ExecuteOnceAsync(key, ChargeAsync, cancelling.Token));

        Assert.Equal(0, runs);
        Assert.Equal(IdempotencyStatus.None, (await fixture.Grains.GetIdempotencyGrain(OnceExecutor.GrainKey("default", key)).GetAsync()).Status);
        await Executor().ExecuteOnceAsync(key, ChargeAsync);
        Assert.Equal(1, runs);
    }

    [Fact]
    public async Task TupleResult_IsStoredWithItsItems_AndEveryCallGetsTheSameValues()
    {
        var once = Executor();
        var key = NewKey();

        var first = await once.ExecuteOnceAsync(key, _ => Task.FromResult((Id: "r-1", Amount: 12.5m)));
        var again = await once.ExecuteOnceAsync(key, _ => Task.FromResult((Id: "r-2", Amount: 1m)));

        Assert.Equal(("r-1", 12.5m), first);
        Assert.Equal(first, again);
    }

    [Fact]
    public async Task FirstCall_GetsItsResultAsStored_AsEveryLaterCallDoes_AndALazySequenceRunsOnce()
    {
        var once = Executor();
        var payment = NewKey();
        var charges = NewKey();
        var charged = 0;

        // A subtype's own members are not stored under the type asked: the first call does not see them either.
        var first = await once.ExecuteOnceAsync<Payment>(payment, _ => Task.FromResult<Payment>(new CardPayment(5m, "4242")));
        var again = await once.ExecuteOnceAsync<Payment>(payment, _ => Task.FromResult(new Payment(6m)));
        // A lazy sequence: enumerated to store it, and never again by the caller.
        var lazy = await once.ExecuteOnceAsync(charges, _ => Task.FromResult(Enumerable.Range(1, 3).Select(i => i * ++charged)));
        var sum = lazy.Sum() + lazy.Sum();

        Assert.Equal(again, first);
        Assert.IsNotType<CardPayment>(first);
        Assert.Equal(3, charged);
        Assert.Equal(2 * (1 + 4 + 9), sum);
    }

    [Fact]
    public async Task ResultWhoseOwnCodeThrowsAsItIsStored_IsRefusedAsNotStored_ToEveryCaller_AndItsWorkRanOnce()
    {
        // The sequence's work runs as the result is stored; the first two charges went through, the third timed out.
        var charged = 0;
        IEnumerable<int> ChargeThree()
        {
            for (var i = 1; i <= 3; i++)
            {
                if (i == 3)
                {
                    throw new TimeoutException("downstream");
                }

                charged++;
                yield return i;
            }
        }

        var once = Executor();
        var lazy = NewKey();
        var getter = NewKey();

        var refused = await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(lazy, _ => Task.FromResult(ChargeThree())));
        Assert.IsType<TimeoutException>(refused.InnerException);
        // A getter's own exception, which the serializer passes on wrapped.
        var unsupported = await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(getter, _ => Task.FromResult(new Unsupported())));
        Assert.IsType<NotSupportedException>(unsupported.InnerException);

        // Never handed back to be read again, and never released to run again, whatever OnceReleasesOnException says.
        Assert.Equal(2, charged);
        Assert.All([refused, unsupported], r => Assert.Equal(OnceRefusal.ResultNotStored, r.Reason));
        Assert.Equal(OnceRefusal.ResultNotStored, (await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(lazy, ChargeAsync))).Reason);
        Assert.Equal(OnceRefusal.ResultNotStored, (await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(getter, ChargeAsync))).Reason);
        Assert.Equal(0, runs);
    }

    [Fact]
    public async Task LazyResultWhoseWorkOutlastsTheLease_KeepsItsClaimByRenewal_AndIsStored()
    {
        var once = Executor();
        var key = NewKey();
        var grain = fixture.Grains.GetIdempotencyGrain(OnceExecutor.GrainKey("default", key));
        var started = new TaskCompletionSource();
        var release = new TaskCompletionSource();
        IEnumerable<int> SlowCharges()
        {
            started.TrySetResult();
            release.Task.Wait();
            yield return Interlocked.Increment(ref runs);
        }

        // The action returns at once; its work runs as its result is written, on the caller's thread.
        var running = Task.Run(() => once.ExecuteOnceAsync(key, _ => Task.FromResult(SlowCharges())));
        try
        {
            await started.Task.WaitAsync(TimeSpan.FromSeconds(10));
            await AssertRenewedPastItsLeaseAsync(grain);
        }
        finally
        {
            // A thread held by the sequence is let go whatever was found.
            release.TrySetResult();
        }

        Assert.Equal([1], await running);
        Assert.Equal([1], await once.ExecuteOnceAsync(key, _ => Task.FromResult(SlowCharges())));
        Assert.Equal(1, runs);
    }

    [Fact]
    public async Task LongAction_KeepsItsClaimByRenewal_AndItsResultIsStored()
    {
        var once = Executor();
        var key = NewKey();
        var grain = fixture.Grains.GetIdempotencyGrain(OnceExecutor.GrainKey("default", key));
        var started = new TaskCompletionSource();
        var release = new TaskCompletionSource();
        var running = once.ExecuteOnceAsync(key, async ct =>
        {
            started.TrySetResult();
            await release.Task;
            return await ChargeAsync(ct);
        });
        await started.Task.WaitAsync(TimeSpan.FromSeconds(10));

        await AssertRenewedPastItsLeaseAsync(grain);

        release.SetResult();
        var result = await running;
        Assert.Equal(result, await once.ExecuteOnceAsync(key, ChargeAsync));
        Assert.Equal(1, runs);
    }

    // Four renewals, each a third of the lease after the last: well past the lease it was claimed with.
    private async Task AssertRenewedPastItsLeaseAsync(IIdempotencyGrain grain)
    {
        var claimedUntil = (await grain.GetAsync()).LeaseExpiresAt;
        for (var i = 0; i < 4; i++)
        {
            var before = (await grain.GetAsync()).LeaseExpiresAt;
            await fixture.ClockRunsUntilAsync(async () => (await grain.GetAsync()).LeaseExpiresAt > before);
        }

        Assert.True((await grain.GetAsync()).LeaseExpiresAt > claimedUntil + IdempotencyPolicy.Default.Lease);
    }

    [Fact]
    public async Task StoreDown_FailsClosed_AndTheActionDoesNotRun_AndTheCallIsOneWarning()
    {
        var log = new FakeLogger<OnceExecutor>();
        var once = Executor(log: log);
        var key = NewKey();

        await fixture.WhileStoreDownAsync(() => Assert.ThrowsAsync<IdempotencyUnavailableException>(() => once.ExecuteOnceAsync(key, ChargeAsync)));
        var afterwards = await once.ExecuteOnceAsync(key, ChargeAsync);

        Assert.Equal(1, runs);
        Assert.NotEqual(Guid.Empty, afterwards.Id);
        var warning = Assert.Single(log.Collector.GetSnapshot());
        Assert.Equal(LogLevel.Warning, warning.Level);
        Assert.Contains(OnceExecutor.GrainKey("default", key).ToString(), warning.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task ResultLargerThanTheLayerStores_IsReturnedOnce_AndLaterCallsAreRefused()
    {
        var once = Executor();
        var key = NewKey();
        var large = new string('x', IdempotencyPolicy.Default.MaxStoredResponseBytes);

        Assert.Equal(large, await once.ExecuteOnceAsync(key, _ => Task.FromResult(large)));
        var refused = await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(key, _ => Task.FromResult("again")));

        Assert.Equal(OnceRefusal.ResultNotStored, refused.Reason);
    }

    [Fact]
    public async Task ResultOfNonAsciiText_WithinTheStoreAsUtf8_IsStoredAndReplayed()
    {
        // 800,000 UTF-8 bytes, within the 1 MiB stored; escaped as \u0436 it would be 2.4 MB.
        var once = Executor();
        var key = NewKey();
        var text = new string('ж', 400_000);

        Assert.Equal(text, await once.ExecuteOnceAsync(key, _ => Task.FromResult(text)));
        Assert.Equal(text, await once.ExecuteOnceAsync(key, _ => Task.FromResult("again")));
    }

    [Fact]
    public async Task StoredResultThatDoesNotReadAsTheTypeAsked_IsRefusedAsNotStored_NotAJsonError()
    {
        var once = Executor();
        var key = NewKey();
        await once.ExecuteOnceAsync(key, _ => Task.FromResult("charged"));

        var refused = await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(key, _ => Task.FromResult(new Charge(Guid.NewGuid(), 5))));

        Assert.Equal(OnceRefusal.ResultNotStored, refused.Reason);
        Assert.IsType<JsonException>(refused.InnerException);

        // A type JSON cannot make at all: a public field and a property under one name.
        var clash = await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(key, _ => Task.FromResult(new Clash())));
        Assert.Equal(OnceRefusal.ResultNotStored, clash.Reason);
    }

    [Fact]
    public async Task ResultThatDoesNotReadBackAsJson_IsRefusedAsNotStored_ToItsFirstCallerAsToLaterOnes()
    {
        var once = Executor();
        var key = NewKey();
        // Valid JSON text whose string escapes half a surrogate pair, as a result relayed from elsewhere can be.
        var halfAPair = JsonDocument.Parse("\"charged \\ud83d\"").RootElement;

        var first = await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(key, _ => Task.FromResult(halfAPair)));
        var again = await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(key, _ => Task.FromResult(halfAPair)));

        Assert.Equal(OnceRefusal.ResultNotStored, first.Reason);
        Assert.Equal(OnceRefusal.ResultNotStored, again.Reason);
    }

    [Fact]
    public async Task ResultThatCannotBeWritten_IsRefusedAsNotStored_ToItsFirstCallerAsToLaterOnes_NotInDoubt()
    {
        var once = Executor();
        var key = NewKey();
        var cycle = new Node();
        cycle.Next = cycle;

        var first = await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(key, _ => Task.FromResult(cycle)));
        var again = await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(key, _ => Task.FromResult(new Node())));

        Assert.Equal(OnceRefusal.ResultNotStored, first.Reason);
        Assert.IsType<JsonException>(first.InnerException);
        Assert.Equal(OnceRefusal.ResultNotStored, again.Reason);
    }

    [Fact]
    public async Task LogThatCannotBeWritten_ChangesNothing_TheCallerGetsTheActionsExceptionOrResult()
    {
        var log = new FailingLog<OnceExecutor>("Once key");
        var once = Executor(releasesOnException: ex => ex is not TimeoutException, log: log);
        var cycle = new Node();
        cycle.Next = cycle;
        var notStorable = NewKey();

        // Left in doubt, not stored, and a store that does not answer: each a line the log refuses.
        await Assert.ThrowsAsync<TimeoutException>(() => once.ExecuteOnceAsync<Charge>(NewKey(), _ => throw new TimeoutException("downstream")));
        await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(notStorable, _ => Task.FromResult(cycle)));
        await fixture.WhileStoreDownAsync(() => Assert.ThrowsAsync<IdempotencyUnavailableException>(() => once.ExecuteOnceAsync(NewKey(), ChargeAsync)));

        Assert.Equal(3, log.Failures);
        Assert.Equal(OnceRefusal.ResultNotStored,
            (await Assert.ThrowsAsync<OnceRefusedException>(() => once.ExecuteOnceAsync(notStorable, _ => Task.FromResult(new Node())))).Reason);
    }

    private sealed record Charge(Guid Id, decimal Amount);

    private sealed class Unsupported
    {
        public int Amount => throw new NotSupportedException("the card network does not say");
    }

    private record Payment(decimal Amount);

    private sealed class Clash
    {
#pragma warning disable CA1051 // The public field is the point: it takes the name the property's JSON name has.
        public int Total = 1;
#pragma warning restore CA1051

        public int total { get; set; }
    }

    private sealed record CardPayment(decimal Amount, string Card) : Payment(Amount);

    /// <summary>The fixture's clock, which cancels a caller's token as the first timer is made (a lease's renewal).</summary>
    private sealed class CancellingAtFirstTimer(TimeProvider inner, CancellationTokenSource cancel) : TimeProvider
    {
        public override DateTimeOffset GetUtcNow() => inner.GetUtcNow();

        public override long GetTimestamp() => inner.GetTimestamp();

        public override long TimestampFrequency => inner.TimestampFrequency;

        public override ITimer CreateTimer(TimerCallback callback, object? state, TimeSpan dueTime, TimeSpan period)
        {
            cancel.Cancel();
            return inner.CreateTimer(callback, state, dueTime, period);
        }
    }

    private sealed class Node
    {
        public Node? Next { get; set; }
    }
}
