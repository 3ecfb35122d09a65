using System.Security.Claims;
using System.Text;
using System.Text.Json;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Logging.Testing;
using Microsoft.Extensions.Options;
using Orleans.Storage;
using OrleansIdempotency.AspNetCore;
using OrleansIdempotency.AspNetCore.Tests;
using OrleansIdempotency.Grains;
using OrleansIdempotency.Once;

namespace OrleansIdempotency.Api.Tests.Once;

/// <summary>
/// The Once API's HTTP handlers on an in-process cluster with a switchable store and a fake clock: what needs an
/// outage or a lapsed lease (the Kestrel tests are in EndToEnd/OnceApiTests).
/// </summary>
[Collection(MiddlewareClusterCollection.Name)]
public sealed class OnceHttpTests(MiddlewareClusterFixture fixture)
{
    private readonly OnceHttp once = Create(fixture, IdempotencyPolicy.Default);

    private static OnceHttp Create(MiddlewareClusterFixture fixture, IdempotencyPolicy policy, ILogger<IdempotencyProblems>? problemsLog = null)
    {
        var options = MiddlewareClusterFixture.Options();
        options.Value.DefaultPolicy = policy;
        return new OnceHttp(
            fixture.Calls(options),
            new IdempotencyProblems(options, problemsLog ?? NullLogger<IdempotencyProblems>.Instance),
            options,
            fixture.Time);
    }

    private static readonly JsonSerializerOptions Unescaped = new() { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    private static string NewKey() => "job-" + Guid.NewGuid().ToString("N");

    private IIdempotencyGrain Grain(string key) => fixture.Grains.GetIdempotencyGrain(OnceExecutor.HttpGrainKey("user:alice", key));

    [Fact]
    public async Task ClaimWhoseAnswerWasLostInAnOutage_IsGivenBack_SoTheNextClaimAcquires()
    {
        var key = NewKey();
        var grain = Grain(key).GetGrainId();
        var lostWrite = fixture.Store.LoseNextWriteInAnOutage(grain);
        Assert.Equal(503, (await CallAsync(once.ClaimAsync, key, "")).Status);

        // The outage ends; the release, retried in the background, gets through before the lost claim lands.
        fixture.Store.Down = false;
        await MiddlewareHarness.WaitUntilAsync(() =>
        {
            fixture.Time.Advance(TimeSpan.FromMilliseconds(200));
            return Task.FromResult(fixture.Store.WritesOf(grain) > 0);
        });
        await Assert.ThrowsAnyAsync<InconsistentStateException>(await lostWrite);

        Assert.Equal(201, (await CallAsync(once.ClaimAsync, key, "")).Status);
    }

    [Fact]
    public async Task LargeInput_ReadInPieces_IsTheSameInputWhereverItsCharactersFallBetweenThem()
    {
        // 300,000 two-byte characters, read from the body 64 KiB at a time: many split between two pieces.
        var input = new string('é', 300_000);
        var key = NewKey();
        // Sent as UTF-8, not escaped: \u00E9 would be six one-byte characters.
        static string Body(string text) => JsonSerializer.Serialize(new { input = text }, Unescaped);
        Assert.Equal(201, (await CallAsync(once.ClaimAsync, key, Body(input))).Status);

        var same = await CallAsync(once.ClaimAsync, key, Body(input));
        var other = await CallAsync(once.ClaimAsync, key, Body(input[..^1] + "e"));
        var trailing = await CallAsync(once.ClaimAsync, key, Body(input) + " {}");

        Assert.EndsWith("request-in-progress", same.Json.GetProperty("type").GetString());
        Assert.EndsWith("key-reused", other.Json.GetProperty("type").GetString());
        Assert.EndsWith("request-invalid", trailing.Json.GetProperty("type").GetString());
    }

    [Theory]
    [InlineData(64 * 1024)]
    [InlineData(128 * 1024)]
    public async Task BodyFillingItsPiecesExactly_CutOffInALiteral_IsRequestInvalid_NotA500(int length)
    {
        // A literal cut off at the end of a body that fills its 64 KiB pieces: the JSON reader failed on it with an
        // IndexOutOfRangeException (a 500) when the pieces ended in an empty one.
        var start = "{\"input\":\"";
        var end = "\",\"attempt\":tr";
        var body = start + new string('x', length - start.Length - end.Length) + end;
        Assert.Equal(length, Encoding.UTF8.GetByteCount(body));

        var response = await CallAsync(once.ClaimAsync, NewKey(), body);

        Assert.Equal(400, response.Status);
        Assert.EndsWith("request-invalid", response.Json.GetProperty("type").GetString());
    }

    [Fact]
    public async Task CallerAskingAgainWithItsAttemptAfterItsLeaseLapsed_IsToldOutcomeUnknown_NotGivenTheKeyAgain()
    {
        // A worker that ran the operation, died, and came back with the attempt id it had kept.
        var key = NewKey();
        var body = JsonSerializer.Serialize(new { attempt = Guid.NewGuid() });
        Assert.Equal(201, (await CallAsync(once.ClaimAsync, key, body)).Status);
        fixture.Time.Advance(IdempotencyPolicy.Default.Lease);

        Assert.Equal("lapsed", await StatusOfAsync(once, key));
        var again = await CallAsync(once.ClaimAsync, key, body);

        Assert.Equal(409, again.Status);
        Assert.EndsWith("outcome-unknown", again.Json.GetProperty("type").GetString());
        Assert.Equal("outcomeUnknown", await StatusOfAsync(once, key));
    }

    [Fact]
    public async Task CallersOwnAttempt_ClaimedElsewhereAndAnswered503_GetsItsClaimWhenItAsksAgain_NotInProgressFromAStaleCopy()
    {
        var key = NewKey();
        var grain = Grain(key);
        var holder = Guid.NewGuid();
        Assert.Equal(201, (await CallAsync(once.ClaimAsync, key, JsonSerializer.Serialize(new { attempt = holder }))).Status);
        // The holder gave the key back and the worker's claim was written, both through another activation of the key
        // (while membership changes); the claim's answer, and that of the try after it, were lost.
        fixture.Store.ClaimNextElsewhere(grain.GetGrainId(), request => fixture.ReleaseAndClaimElsewhereAsync(grain, holder, request), lostTries: 2);
        var body = JsonSerializer.Serialize(new { attempt = Guid.NewGuid() });
        Assert.Equal(503, (await CallAsync(once.ClaimAsync, key, body)).Status);

        // The worker asks again with its attempt, reaching the activation whose copy still shows the holder.
        var again = await CallAsync(once.ClaimAsync, key, body);

        Assert.Equal(201, again.Status);
        Assert.Equal("acquired", again.Json.GetProperty("status").GetString());
    }

    [Fact]
    public async Task StoreDown_TheClaims503IsLogged_NamingTheCallersScopedKey()
    {
        var log = new FakeLogger<IdempotencyProblems>();
        var logged = Create(fixture, IdempotencyPolicy.Default, log);
        var key = NewKey();

        Assert.Equal(503, (await fixture.WhileStoreDownAsync(() => CallAsync(logged.ClaimAsync, key, ""))).Status);

        var warning = Assert.Single(log.Collector.GetSnapshot());
        Assert.Equal(LogLevel.Warning, warning.Level);
        Assert.Contains(Grain(key).GetPrimaryKeyString(), warning.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task CallersOwnAttemptAnswered503_IsNotGivenBack_ForItMayHoldAClaimItActedOn()
    {
        var key = NewKey();
        var grain = Grain(key).GetGrainId();
        var body = JsonSerializer.Serialize(new { attempt = Guid.NewGuid() });
        Assert.Equal(201, (await CallAsync(once.ClaimAsync, key, body)).Status);
        fixture.Time.Advance(IdempotencyPolicy.Default.Lease);
        var writes = fixture.Store.WritesOf(grain);

        Assert.Equal(503, (await fixture.WhileStoreDownAsync(() => CallAsync(once.ClaimAsync, key, body))).Status);
        for (var i = 0; i < 20; i++)
        {
            fixture.Time.Advance(TimeSpan.FromMilliseconds(200));
            await Task.Delay(10);
        }

        Assert.Equal(writes, fixture.Store.WritesOf(grain));
        var another = await CallAsync(once.ClaimAsync, key, "");
        Assert.Equal(409, another.Status);
        Assert.EndsWith("outcome-unknown", another.Json.GetProperty("type").GetString());
    }

    [Fact]
    public async Task ReleaseOfItsClaimAfterTheLeaseLapsed_OrOnceFoundInDoubt_Is204_AndTheNextClaimRuns()
    {
        // The caller knows what no later caller could: its operation did not take effect.
        foreach (var foundInDoubt in new[] { false, true })
        {
            var key = NewKey();
            var token = await TokenOfANewClaimAsync(once, key);
            fixture.Time.Advance(IdempotencyPolicy.Default.Lease);
            if (foundInDoubt)
            {
                Assert.Equal(409, (await CallAsync(once.ClaimAsync, key, "")).Status);
                Assert.Equal("outcomeUnknown", await StatusOfAsync(once, key));
            }

            Assert.Equal(204, (await CallAsync(once.ReleaseAsync, key, JsonSerializer.Serialize(new { token }))).Status);
            Assert.Equal(201, (await CallAsync(once.ClaimAsync, key, "")).Status);
        }
    }

    [Fact]
    public async Task CompleteAfterTheLeaseLapsed_Is409ClaimNotHeld_AndNothingIsStored()
    {
        var key = NewKey();
        var token = await TokenOfANewClaimAsync(once, key);
        fixture.Time.Advance(IdempotencyPolicy.Default.Lease);

        var late = await CallAsync(once.CompleteAsync, key, JsonSerializer.Serialize(new { token, result = 1 }));

        Assert.Equal(409, late.Status);
        Assert.EndsWith("claim-not-held", late.Json.GetProperty("type").GetString());
        Assert.Equal("lapsed", await StatusOfAsync(once, key));
    }

    [Fact]
    public async Task ClaimInputWithHalfASurrogatePairEscaped_Is400_AndNothingIsClaimed()
    {
        var key = NewKey();

        var refused = await CallAsync(once.ClaimAsync, key, "{\"input\":\"refund \\ud800\"}");

        Assert.Equal(400, refused.Status);
        Assert.EndsWith("request-invalid", refused.Json.GetProperty("type").GetString());
        Assert.Equal(0, fixture.Store.WritesOf(Grain(key).GetGrainId()));
    }

    [Fact]
    public async Task EmptyAttempt_Is400_SinceEveryCallerLeavingItUnsetWouldShareOneClaim()
    {
        var key = NewKey();

        var response = await CallAsync(once.ClaimAsync, key, JsonSerializer.Serialize(new { attempt = Guid.Empty }));

        Assert.Equal(400, response.Status);
        Assert.Equal(IdempotencyStatus.None, (await Grain(key).GetAsync()).Status);
    }

    [Fact]
    public async Task CompletionWhoseResultRepeatsAName_IsStoredAsSent_ButNotABodyGivingItsResultTwice()
    {
        // The operation ran: its result is the caller's JSON, repeated names and all, not refused as a claim's body is.
        var key = NewKey();
        var token = await TokenOfANewClaimAsync(once, key);

        var twice = await CallAsync(once.CompleteAsync, key, $"{{\"token\":\"{token}\",\"result\":{{\"b\":1}},\"Result\":{{\"b\":2}}}}");
        var completed = await CallAsync(once.CompleteAsync, key, $"{{\"token\":\"{token}\",\"result\":{{\"a\":1,\"a\":2}}}}");
        var read = await CallAsync(once.ReadAsync, key, "");

        // The body's own member given twice is refused, as a claim's is: which result was meant would be a guess.
        Assert.Equal(400, twice.Status);
        Assert.Equal(200, completed.Status);
        Assert.Equal("{\"a\":1,\"a\":2}", read.Json.GetProperty("result").GetRawText());
    }

    [Fact]
    public async Task CompletionAskedAgainWithAnotherResult_KeepsTheFirst_AndSaysNothingElse()
    {
        var key = NewKey();
        var token = await TokenOfANewClaimAsync(once, key);

        var first = await CallAsync(once.CompleteAsync, key, JsonSerializer.Serialize(new { token, result = 1 }));
        var second = await CallAsync(once.CompleteAsync, key, JsonSerializer.Serialize(new { token, result = 2 }));
        var read = await CallAsync(once.ReadAsync, key, "");

        Assert.Equal(200, first.Status);
        Assert.Equal(200, second.Status);
        Assert.False(second.Json.TryGetProperty("result", out _));
        Assert.Equal(1, read.Json.GetProperty("result").GetInt32());
    }

    [Fact]
    public async Task ClaimWithoutAttemptWhoseCallerLeftWhileItWasWritten_IsGivenBack_SoTheNextClaimAcquires()
    {
        var key = NewKey();
        using var leaving = new CancellationTokenSource();
        fixture.Store.BeforeNextWrite(Grain(key).GetGrainId(), () => leaving.CancelAsync());

        await CallAsync(once.ClaimAsync, key, "", leaving.Token);

        // No lease has to lapse: the claim no one heard of was given back.
        await MiddlewareHarness.WaitUntilAsync(async () => (await Grain(key).GetAsync()).Status == IdempotencyStatus.None);
        Assert.Equal(201, (await CallAsync(once.ClaimAsync, key, "")).Status);
    }

    [Fact]
    public async Task ReleaseWithTheTokenOfAnEarlierClaimOfTheSameAttempt_Is409_AndTheLiveClaimStays()
    {
        // Under Reclaim, an attempt asking again after its lease lapsed holds a new claim: the old token releases nothing.
        var reclaiming = Create(fixture, IdempotencyPolicy.Default with { OnLapsedLease = LapsedLeasePolicy.Reclaim });
        var key = NewKey();
        var body = JsonSerializer.Serialize(new { attempt = Guid.NewGuid() });
        var stale = (await CallAsync(reclaiming.ClaimAsync, key, body)).Json.GetProperty("token").GetString();
        fixture.Time.Advance(IdempotencyPolicy.Default.Lease);
        var live = (await CallAsync(reclaiming.ClaimAsync, key, body)).Json.GetProperty("token").GetString();
        Assert.NotEqual(stale, live);

        var release = await CallAsync(reclaiming.ReleaseAsync, key, JsonSerializer.Serialize(new { token = stale }));

        Assert.Equal(409, release.Status);
        Assert.EndsWith("claim-not-held", release.Json.GetProperty("type").GetString());
        Assert.Equal("inProgress", await StatusOfAsync(reclaiming, key));
        Assert.Equal(200, (await CallAsync(reclaiming.CompleteAsync, key, JsonSerializer.Serialize(new { token = live, result = 1 }))).Status);
    }

    [Fact]
    public async Task Renew_ExtendsTheClaimsLeaseInTheGrain_PastWhereItWouldHaveLapsed()
    {
        var key = NewKey();
        var lease = IdempotencyPolicy.Default.Lease;
        var claimed = await CallAsync(once.ClaimAsync, key, "");
        var token = claimed.Json.GetProperty("token").GetString();
        var firstEnd = claimed.Json.GetProperty("leaseExpiresAt").GetDateTimeOffset();
        fixture.Time.Advance(lease * 2 / 3);

        var renewed = await CallAsync(once.RenewAsync, key, JsonSerializer.Serialize(new { token }));
        fixture.Time.Advance(lease / 2);
        var read = await CallAsync(once.ReadAsync, key, "");

        Assert.Equal(200, renewed.Status);
        Assert.True(renewed.Json.GetProperty("leaseExpiresAt").GetDateTimeOffset() > firstEnd);
        Assert.Equal("inProgress", read.Json.GetProperty("status").GetString());
        Assert.True(read.Json.GetProperty("leaseExpiresAt").GetDateTimeOffset() >= firstEnd + lease * 2 / 3);
        Assert.Equal(200, (await CallAsync(once.CompleteAsync, key, JsonSerializer.Serialize(new { token, result = 1 }))).Status);
    }

    [Fact]
    public async Task ReleaseAskedAgain_Is204Again_ForTheKeyIsFree()
    {
        // The first answer lost on its way back: the caller asks again and must not be told another attempt owns the key.
        var key = NewKey();
        var token = await TokenOfANewClaimAsync(once, key);
        var body = JsonSerializer.Serialize(new { token });

        Assert.Equal(204, (await CallAsync(once.ReleaseAsync, key, body)).Status);
        Assert.Equal(204, (await CallAsync(once.ReleaseAsync, key, body)).Status);
        Assert.Equal(201, (await CallAsync(once.ClaimAsync, key, "")).Status);
        Assert.Equal(409, (await CallAsync(once.ReleaseAsync, key, body)).Status);
    }

    [Fact]
    public async Task ClaimWithoutAttempt_WhoseAnswerWasLostUntilItsLeaseLapsed_IsGivenAgain_ForNothingRan()
    {
        // The claim was written, its answer lost; the cluster answered again only after the lease (shorter than the
        // retry budget) had run out. The attempt was made here and asked again only unanswered: not in doubt.
        var lease = TimeSpan.FromSeconds(1);
        var shortLease = Create(fixture, IdempotencyPolicy.Default with { Lease = lease });
        var key = NewKey();
        var grain = Grain(key).GetGrainId();
        var lostWrite = fixture.Store.LoseNextWriteInAnOutage(grain);
        var failure = fixture.Store.Failure;
        fixture.Store.Failure = () => new TimeoutException("The silo did not answer (test switch).");
        try
        {
            var claiming = CallAsync(shortLease.ClaimAsync, key, "");
            await (await lostWrite)();
            fixture.Time.Advance(lease);
            fixture.Store.Down = false;
            await MiddlewareHarness.WaitUntilAsync(async () =>
            {
                fixture.Time.Advance(TimeSpan.FromMilliseconds(100));
                await Task.Delay(10);
                return claiming.IsCompleted;
            });

            var claim = await claiming;
            Assert.Equal(201, claim.Status);
            Assert.Equal("acquired", claim.Json.GetProperty("status").GetString());
            Assert.Equal(IdempotencyStatus.InProgress, (await Grain(key).GetAsync()).Status);
        }
        finally
        {
            fixture.Store.Failure = failure;
            fixture.Store.Down = false;
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task ResultBodyLargerThanTheLargestResultStored_Is413_ReadNoFurther_AndTheClaimStaysHeld(bool announcesItsLength)
    {
        var key = NewKey();
        var token = await TokenOfANewClaimAsync(once, key);
        var large = new LargeResult(token!, 3 * 1024 * 1024);

        var response = await CallAsync(once.CompleteAsync, key, large, announcesItsLength ? large.Length : null);

        Assert.Equal(413, response.Status);
        Assert.EndsWith("body-too-large", response.Json.GetProperty("type").GetString());
        if (announcesItsLength)
        {
            Assert.Equal(0, large.BytesRead);
        }
        else
        {
            Assert.InRange(large.BytesRead, 0, IdempotencyPolicy.Default.MaxStoredResponseBytes + (128 * 1024));
        }

        Assert.Equal(200, (await CallAsync(once.CompleteAsync, key, JsonSerializer.Serialize(new { token, result = 1 }))).Status);
    }

    [Fact]
    public async Task ResultThatFitsTheBodyButNotTheStore_Is413_AndTheClaimStaysHeld()
    {
        // A body may exceed the largest result by its token and some room: the result itself is measured after.
        var small = Create(fixture, IdempotencyPolicy.Default with { MaxStoredResponseBytes = 1024 });
        var key = NewKey();
        var token = await TokenOfANewClaimAsync(small, key);

        var tooLarge = await CallAsync(small.CompleteAsync, key, JsonSerializer.Serialize(new { token, result = new string('r', 2000) }));

        Assert.Equal(413, tooLarge.Status);
        Assert.EndsWith("body-too-large", tooLarge.Json.GetProperty("type").GetString());
        Assert.Equal(200, (await CallAsync(small.CompleteAsync, key, JsonSerializer.Serialize(new { token, result = 1 }))).Status);
        Assert.Equal(1, (await CallAsync(small.ReadAsync, key, "")).Json.GetProperty("result").GetInt32());
    }

    [Fact]
    public async Task ResultOfNonAsciiText_IsMeasuredAndStoredAsItsUtf8_NotEscaped()
    {
        // 2,000 UTF-8 bytes: within the store's 3,000, though escaped as \u00e9 it would be 6,000.
        var small = Create(fixture, IdempotencyPolicy.Default with { MaxStoredResponseBytes = 3000 });
        var key = NewKey();
        var token = await TokenOfANewClaimAsync(small, key);
        var text = new string('é', 1000);

        Assert.Equal(200, (await CallAsync(small.CompleteAsync, key, JsonSerializer.Serialize(new { token, result = text }))).Status);
        Assert.Equal(text, (await CallAsync(small.ReadAsync, key, "")).Json.GetProperty("result").GetString());
    }

    [Theory]
    [InlineData("{\"inptu\":\"refund 42\"}")]
    [InlineData("{\"input\":\"refund 42\",\"attempt\":\"8c1f43c2-5b8a-4f51-a3a8-6b7f9d4e2a10\",\"atempt\":1}")]
    [InlineData("{\"input\":\"refund 5\",\"Input\":\"refund 500\"}")]
    [InlineData("{\"input\":\"refund 5\",\"input\":\"refund 500\"}")]
    public async Task ClaimBodyWithAMemberItDoesNotTake_OrOneGivenTwice_Is400_AndNothingIsClaimed(string body)
    {
        // A misspelt input would be hashed as no input at all, and the key's other requests not told apart from it;
        // of one given twice, which was hashed would be a guess.
        var key = NewKey();

        var refused = await CallAsync(once.ClaimAsync, key, body);

        Assert.Equal(400, refused.Status);
        Assert.EndsWith("request-invalid", refused.Json.GetProperty("type").GetString());
        Assert.Equal(0, fixture.Store.WritesOf(Grain(key).GetGrainId()));
    }

    [Fact]
    public async Task StoredResultThatIsNotJson_IsResponseNotStored_NotA500()
    {
        // An operator naming a key by its scope's digest settles it without knowing it is a Once API key.
        var key = NewKey();
        var html = "<html>charged</html>"u8.ToArray();
        var claim = await Grain(key).ClaimAsync(new ClaimRequest(Guid.NewGuid(), OnceExecutor.Fingerprint(""), IdempotencyPolicy.Default.Lease, IdempotencyPolicy.Default.Retention));
        Assert.True(await Grain(key).CompleteAsync(claim.Token!.Value, new StoredResponse(201, [], html, false, html.Length)));

        var read = await CallAsync(once.ReadAsync, key, "");

        Assert.Equal(409, read.Status);
        Assert.EndsWith("response-not-stored", read.Json.GetProperty("type").GetString());
    }

    [Fact]
    public async Task ResultAsDeepAsJsonIsRead_IsAnsweredWhole_NotA500()
    {
        // An operator's resolution may store one 64 levels deep; the answer holds it a level further down.
        var key = NewKey();
        var deep = Encoding.UTF8.GetBytes(new string('[', 64) + new string(']', 64));
        var claim = await Grain(key).ClaimAsync(new ClaimRequest(Guid.NewGuid(), OnceExecutor.Fingerprint(""), IdempotencyPolicy.Default.Lease, IdempotencyPolicy.Default.Retention));
        Assert.True(await Grain(key).CompleteAsync(claim.Token!.Value, new StoredResponse(OnceExecutor.ResultStatus, [], deep, false, deep.Length)));

        var read = await CallAsync(once.ReadAsync, key, "");
        var replayed = await CallAsync(once.ClaimAsync, key, "");

        Assert.Equal(200, read.Status);
        Assert.Equal(200, replayed.Status);
        Assert.Equal(Encoding.UTF8.GetString(deep), replayed.Json.GetProperty("result").GetRawText());
    }

    [Theory]
    [InlineData(256, 'k')]
    [InlineData(4, 'é')]
    [InlineData(4, ' ')]
    public async Task KeyOfThePathNotVisibleAsciiUpTo255_Is400KeyInvalid_AndNothingIsClaimed(int length, char fill)
    {
        var key = "job" + new string(fill, length - 3);

        var refused = await CallAsync(once.ClaimAsync, key, "");

        Assert.Equal(400, refused.Status);
        Assert.EndsWith("key-invalid", refused.Json.GetProperty("type").GetString());
        Assert.Equal(0, fixture.Store.WritesOf(Grain(key).GetGrainId()));
    }

    [Fact]
    public async Task ClaimInputLargerThanTheLargestResult_IsTaken_UpToTheBoundOfARequestBody()
    {
        // An input is only hashed, as an idempotent request's body is.
        var small = Create(fixture, IdempotencyPolicy.Default with { MaxStoredResponseBytes = 1024, MaxRequestBodyBytes = 200 * 1024 });
        var input = new string('i', 100 * 1024);

        Assert.Equal(201, (await CallAsync(small.ClaimAsync, NewKey(), JsonSerializer.Serialize(new { input }))).Status);
        var tooLarge = await CallAsync(small.ClaimAsync, NewKey(), JsonSerializer.Serialize(new { input = input + input }));
        Assert.Equal(413, tooLarge.Status);
        Assert.EndsWith("body-too-large", tooLarge.Json.GetProperty("type").GetString());
    }

    [Fact]
    public async Task CallerThatLeavesMidBody_IsLeftWithoutAnswer_NotA500_AndNothingIsClaimed()
    {
        var key = NewKey();
        using var gone = new CancellationTokenSource();

        var (status, json) = await CallAsync(once.ClaimAsync, key, new RefusedBody(new IOException("The client reset the request stream.")) { AsItFails = gone.Cancel }, null, gone.Token);

        Assert.Equal(200, status);
        Assert.Equal(JsonValueKind.Undefined, json.ValueKind);
        Assert.Equal(IdempotencyStatus.None, (await Grain(key).GetAsync()).Status);
    }

    [Fact]
    public async Task BodyTheServerRefusesAsItIsRead_IsItsProblem_WithTheServersStatus()
    {
        var key = NewKey();
        var cutOff = new RefusedBody(400);

        var response = await CallAsync(once.ClaimAsync, key, cutOff, null);

        Assert.Equal(400, response.Status);
        Assert.EndsWith("body-unreadable", response.Json.GetProperty("type").GetString());
        Assert.Equal(IdempotencyStatus.None, (await Grain(key).GetAsync()).Status);
    }

    // The token of a claim of a new key, without input or attempt.
    private static async Task<string?> TokenOfANewClaimAsync(OnceHttp http, string key) =>
        (await CallAsync(http.ClaimAsync, key, "")).Json.GetProperty("token").GetString();

    // What GET /once/{key} says of the key: none, inProgress, lapsed, completed or outcomeUnknown.
    private static async Task<string?> StatusOfAsync(OnceHttp http, string key) =>
        (await CallAsync(http.ReadAsync, key, "")).Json.GetProperty("status").GetString();

    private static Task<(int Status, JsonElement Json)> CallAsync(
        Func<HttpContext, string, Task> call, string key, string body, CancellationToken requestAborted = default) =>
        CallAsync(call, key, new MemoryStream(Encoding.UTF8.GetBytes(body)), null, requestAborted);

    private static async Task<(int Status, JsonElement Json)> CallAsync(
        Func<HttpContext, string, Task> call, string key, Stream body, long? contentLength, CancellationToken requestAborted = default)
    {
        var context = new DefaultHttpContext { RequestAborted = requestAborted };
        context.Request.Method = "POST";
        context.Request.Body = body;
        context.Request.ContentLength = contentLength;
        context.Response.Body = new MemoryStream();
        context.User = new ClaimsPrincipal(new ClaimsIdentity([new Claim(ClaimTypes.NameIdentifier, "alice")], "test"));
        await call(context, key);
        var bytes = ((MemoryStream)context.Response.Body).ToArray();
        return (context.Response.StatusCode, bytes.Length == 0 ? default : JsonDocument.Parse(bytes, new JsonDocumentOptions { MaxDepth = 128 }).RootElement);
    }

    /// <summary>A completion whose result string is <c>length</c> bytes long; counts what was read of it.</summary>
    private sealed class LargeResult(string token, long length) : MemoryStream
    {
        private readonly byte[] start = Encoding.UTF8.GetBytes($"{{\"token\":\"{token}\",\"result\":\"");

        public override long Length => length;

        public long BytesRead { get; private set; }

        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
        {
            var span = buffer.Span[..(int)Math.Min(buffer.Length, length - BytesRead)];
            for (var i = 0; i < span.Length; i++)
            {
                var at = BytesRead + i;
                span[i] = at < start.Length ? start[at] : at >= length - 2 ? "\"}"u8[(int)(at - (length - 2))] : (byte)'x';
            }

            BytesRead += span.Length;
            return ValueTask.FromResult(span.Length);
        }

        public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
            ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();
    }
}
