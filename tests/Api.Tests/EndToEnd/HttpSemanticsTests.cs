using System.Net;
using System.Text.Json;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

/// <summary>DESIGN §4 row by row, through real HTTP, against the demo API on real PostgreSQL and Redis.</summary>
[Collection(EndToEndCollection.Name)]
public sealed class HttpSemanticsTests(EndToEndFixture fixture)
{
    private readonly HttpClient alice = fixture.Api.Client("demo-alice");
    private readonly HttpClient bob = fixture.Api.Client("demo-bob");

    private static string NewKey() => Guid.NewGuid().ToString();

    [Fact]
    public async Task NewKey_CreatesTheOrder_AndTheReplayReturnsTheOriginalBytes()
    {
        var key = NewKey();

        var (first, firstBody) = await alice.SendAsync("/orders", key, Requests.OrderBody);
        var (replay, replayBody) = await alice.SendAsync("/orders", key, Requests.OrderBody);

        Assert.Equal(HttpStatusCode.Created, first.StatusCode);
        Assert.False(first.IsReplay());
        Assert.Equal(HttpStatusCode.Created, replay.StatusCode);
        Assert.True(replay.IsReplay());
        Assert.Equal(firstBody, replayBody);
        Assert.Equal(first.Headers.Location, replay.Headers.Location);
        Assert.Equal(first.ContentType(), replay.ContentType());
        Assert.Equal(1, await fixture.CountAsync("demo_orders", key));
        Assert.Equal(1, await ChargesAsync(first));

        var id = JsonDocument.Parse(firstBody).RootElement.GetProperty("id").GetString();
        var fetched = await alice.GetAsync($"/orders/{id}");
        Assert.Equal(HttpStatusCode.OK, fetched.StatusCode);
        // The order as stored is the order the replay tells of, to its creation time's last digit.
        Assert.Equal(System.Text.Encoding.UTF8.GetString(firstBody), await fetched.Content.ReadAsStringAsync());
        Assert.Contains(id!, await alice.GetStringAsync("/orders"), StringComparison.Ordinal);
        var others = await bob.GetAsync($"/orders/{id}");
        Assert.Equal(HttpStatusCode.NotFound, others.StatusCode);
        Assert.Equal("application/problem+json", others.Content.Headers.ContentType?.MediaType);
    }

    [Fact]
    public async Task MissingKey_Is400ProblemWithDescribedByLink()
    {
        var (response, body) = await alice.SendAsync("/orders", key: null, Requests.OrderBody);

        Assert.Equal(HttpStatusCode.BadRequest, response.StatusCode);
        Assert.Equal("application/problem+json", response.ContentType()!.MediaType);
        Assert.Contains("describedby", response.Headers.GetValues("Link").Single(), StringComparison.Ordinal);
        var problem = JsonDocument.Parse(body).RootElement;
        foreach (var member in new[] { "type", "title", "status", "detail", "instance", "idempotencyKey", "retryable", "traceId" })
        {
            Assert.True(problem.TryGetProperty(member, out _), member);
        }
    }

    [Theory]
    [InlineData("a,b")]
    [InlineData("\"unterminated")]
    [InlineData("k;q=1")]
    public async Task InvalidKey_Is400Problem(string key)
    {
        var (response, body) = await alice.SendAsync("/orders", key, Requests.OrderBody);

        Assert.Equal(HttpStatusCode.BadRequest, response.StatusCode);
        Assert.EndsWith("/key-invalid", JsonDocument.Parse(body).RootElement.GetProperty("type").GetString(), StringComparison.Ordinal);
    }

    [Fact]
    public async Task SameKeyDifferentBody_Is422_AndNothingRuns()
    {
        var key = NewKey();
        await alice.SendAsync("/orders", key, Requests.OrderBody);

        var (response, _) = await alice.SendAsync("/orders", key, Requests.OrderBody.Replace("12.50", "99.00", StringComparison.Ordinal));
        var (onAnotherRoute, _) = await alice.SendAsync("/payments", key, Requests.PaymentBody);

        Assert.Equal(HttpStatusCode.UnprocessableEntity, response.StatusCode);
        Assert.Equal(HttpStatusCode.UnprocessableEntity, onAnotherRoute.StatusCode);
        Assert.Equal(1, await fixture.CountAsync("demo_orders", key));
        Assert.Equal(0, await fixture.CountAsync("demo_payments", key));
    }

    [Fact]
    public async Task AliceAndBob_WithTheSameKey_EachGetTheirOwnOrder()
    {
        var key = NewKey();

        var (forAlice, aliceBody) = await alice.SendAsync("/orders", key, Requests.OrderBody);
        var (forBob, bobBody) = await bob.SendAsync("/orders", key, Requests.OrderBody);

        Assert.Equal(HttpStatusCode.Created, forAlice.StatusCode);
        Assert.Equal(HttpStatusCode.Created, forBob.StatusCode);
        Assert.False(forBob.IsReplay());
        Assert.NotEqual(aliceBody, bobBody);
        Assert.Equal(2, await fixture.CountAsync("demo_orders", key));
        var bobsOrders = await bob.GetStringAsync("/orders");
        Assert.DoesNotContain(JsonDocument.Parse(aliceBody).RootElement.GetProperty("id").GetString()!, bobsOrders, StringComparison.Ordinal);
    }

    [Fact]
    public async Task FailedFirstAttempt_ThenRetryUnderTheSameKey_MakesExactlyOneOrder()
    {
        var key = NewKey();

        var (failed, _) = await alice.SendAsync("/orders", key, Requests.OrderBody, ("X-Demo-Fail", "500"));
        var (retry, retryBody) = await alice.SendAsync("/orders", key, Requests.OrderBody);
        var (replay, replayBody) = await alice.SendAsync("/orders", key, Requests.OrderBody);

        Assert.Equal(HttpStatusCode.InternalServerError, failed.StatusCode);
        Assert.Equal(HttpStatusCode.Created, retry.StatusCode);
        Assert.False(retry.IsReplay());
        Assert.True(replay.IsReplay());
        Assert.Equal(retryBody, replayBody);
        Assert.Equal(1, await fixture.CountAsync("demo_orders", key));
    }

    [Fact]
    public async Task ClientThatGaveUpMidAction_GetsItsOrderOnTheRetry_AndExactlyOneOrderExists()
    {
        var key = NewKey();
        using (var impatient = new CancellationTokenSource())
        using (var request = Requests.Post("/orders", key, Requests.OrderBody, ("X-Demo-Delay-Ms", "1500")))
        {
            var sending = alice.SendAsync(request, impatient.Token);
            await fixture.WaitUntilInProgressAsync(key);
            await impatient.CancelAsync();
            await Assert.ThrowsAnyAsync<OperationCanceledException>(() => sending);
        }

        // The action runs on without its client; the retry waits for it (DESIGN §4) and gets its whole response.
        var (retry, body) = await alice.SendAsync("/orders", key, Requests.OrderBody);

        Assert.Equal(HttpStatusCode.Created, retry.StatusCode);
        Assert.True(retry.IsReplay());
        Assert.Equal(1, await fixture.CountAsync("demo_orders", key));
        var id = JsonDocument.Parse(body).RootElement.GetProperty("id").GetString();
        Assert.Equal($"/orders/{id}", retry.Headers.Location?.OriginalString);
        Assert.Equal(HttpStatusCode.OK, (await alice.GetAsync(retry.Headers.Location)).StatusCode);
    }

    [Fact]
    public async Task ClientThatGaveUpBeforeALargeResponse_GetsTheWholeBodyOnTheRetry_NotTheStartOfIt()
    {
        // ASP.NET Core's JSON writers stop at the next flush once the client has gone and swallow the cancellation;
        // a body of many flushes would be stored cut short, as a 201, and replayed so for the key's retention.
        var key = NewKey();
        const int lines = 4_000;
        var items = string.Join(',', Enumerable.Range(0, lines).Select(i => $"{{\"sku\":\"SKU-{i:D5}\",\"quantity\":{i % 9 + 1}}}"));
        var order = $"{{\"customerId\":\"c-1\",\"amount\":12.50,\"items\":[{items}]}}";
        using (var impatient = new CancellationTokenSource())
        using (var request = Requests.Post("/orders", key, order, ("X-Demo-Delay-Ms", "1500")))
        {
            var sending = alice.SendAsync(request, impatient.Token);
            await fixture.WaitUntilInProgressAsync(key);
            await impatient.CancelAsync();
            await Assert.ThrowsAnyAsync<OperationCanceledException>(() => sending);
        }

        var (retry, body) = await alice.SendAsync("/orders", key, order);

        Assert.Equal(HttpStatusCode.Created, retry.StatusCode);
        Assert.True(retry.IsReplay());
        Assert.True(body.Length > 100_000, $"the replayed body has {body.Length} characters");
        Assert.Equal(lines, JsonDocument.Parse(body).RootElement.GetProperty("items").GetArrayLength());
        Assert.Equal(1, await fixture.CountAsync("demo_orders", key));
    }

    [Fact]
    public async Task OperatorSurface_ReadsAnyCallersKey_ForOperatorsOnly()
    {
        var key = NewKey();
        await alice.SendAsync("/orders", key, Requests.OrderBody);
        var path = $"/idempotency/keys?scope=user:alice&key={key}";
        using var ops = fixture.Api.Client("demo-ops");

        var asAlice = await alice.GetAsync(path);
        var asOperator = await ops.GetAsync(path);

        Assert.Equal(HttpStatusCode.Forbidden, asAlice.StatusCode);
        Assert.Equal("application/problem+json", asAlice.Content.Headers.ContentType?.MediaType);
        Assert.Equal(403, JsonDocument.Parse(await asAlice.Content.ReadAsStringAsync()).RootElement.GetProperty("status").GetInt32());
        Assert.Equal(HttpStatusCode.OK, asOperator.StatusCode);
        var state = JsonDocument.Parse(await asOperator.Content.ReadAsStringAsync()).RootElement;
        Assert.Equal("completed", state.GetProperty("status").GetString());
        Assert.Equal(201, state.GetProperty("responseStatus").GetInt32());
    }

    [Fact]
    public async Task ClientErrors_AreStoredAndReplayed()
    {
        var key = NewKey();
        const string invalid = "{\"customerId\":\"\",\"amount\":-1,\"items\":[]}";

        var (first, firstBody) = await alice.SendAsync("/orders", key, invalid);
        var (replay, replayBody) = await alice.SendAsync("/orders", key, invalid);

        Assert.Equal(HttpStatusCode.BadRequest, first.StatusCode);
        Assert.True(replay.IsReplay());
        Assert.Equal(firstBody, replayBody);
        Assert.Equal(0, await fixture.CountAsync("demo_orders", key));
    }

    [Fact]
    public async Task Unauthenticated_Is401_AndClaimsNothing()
    {
        var key = NewKey();
        using var anonymous = fixture.Api.Client(apiKey: null);
        using var wrong = fixture.Api.Client(apiKey: "not-a-key");

        Assert.Equal(HttpStatusCode.Unauthorized, (await anonymous.SendAsync("/orders", key, Requests.OrderBody)).Response.StatusCode);
        Assert.Equal(HttpStatusCode.Unauthorized, (await wrong.SendAsync("/orders", key, Requests.OrderBody)).Response.StatusCode);

        // No record of the key in any scope, the anonymous one included; alice's request then makes the one record.
        Assert.Equal(0L, await RecordsOfAsync(key));
        Assert.Equal(HttpStatusCode.Created, (await alice.SendAsync("/orders", key, Requests.OrderBody)).Response.StatusCode);
        Assert.Equal(1L, await RecordsOfAsync(key));

        async Task<long> RecordsOfAsync(string key)
        {
            await using var connection = new Npgsql.NpgsqlConnection(fixture.Postgres);
            await connection.OpenAsync();
            await using var command = new Npgsql.NpgsqlCommand("SELECT count(*) FROM OrleansStorage WHERE GrainIdExtensionString LIKE '%:' || @key", connection);
            command.Parameters.AddWithValue("key", key);
            return (long)(await command.ExecuteScalarAsync())!;
        }
    }

    [Fact]
    public async Task Payments_CreateOnce_AndListTheCallersPayments()
    {
        var key = NewKey();

        var (created, body) = await alice.SendAsync("/payments", key, "{\"amount\":5.00}");
        var (replay, replayBody) = await alice.SendAsync("/payments", key, "{\"amount\":5.00}");

        Assert.Equal(HttpStatusCode.Created, created.StatusCode);
        Assert.Equal("EUR", JsonDocument.Parse(body).RootElement.GetProperty("currency").GetString());
        Assert.True(replay.IsReplay());
        Assert.Equal(body, replayBody);
        Assert.Contains(JsonDocument.Parse(body).RootElement.GetProperty("id").GetString()!, await alice.GetStringAsync("/payments"), StringComparison.Ordinal);
        Assert.Equal(1, await fixture.CountAsync("demo_payments", key));
        var located = await alice.GetAsync(created.Headers.Location);
        Assert.Equal(HttpStatusCode.OK, located.StatusCode);
        Assert.Equal(System.Text.Encoding.UTF8.GetString(body), await located.Content.ReadAsStringAsync());
        Assert.Equal(HttpStatusCode.NotFound, (await bob.GetAsync(created.Headers.Location)).StatusCode);
    }

    [Fact]
    public async Task BenchEndpoints_EchoWithAndWithoutTheLayer()
    {
        var key = NewKey();
        const string body = "{\"n\":1}";

        var (plain, plainBody) = await alice.SendAsync("/bench/plain", key: null, body);
        var (first, firstBody) = await alice.SendAsync("/bench/idempotent", key, body);
        var (replay, _) = await alice.SendAsync("/bench/idempotent", key, body);
        var (missing, _) = await alice.SendAsync("/bench/idempotent", key: null, body);

        Assert.Equal(HttpStatusCode.OK, plain.StatusCode);
        Assert.Equal(body, System.Text.Encoding.UTF8.GetString(plainBody));
        Assert.Equal(plainBody, firstBody);
        Assert.True(replay.IsReplay());
        Assert.Equal(HttpStatusCode.BadRequest, missing.StatusCode);
    }

    private async Task<long> ChargesAsync(HttpResponseMessage created)
    {
        await using var connection = new Npgsql.NpgsqlConnection(fixture.Postgres);
        await connection.OpenAsync();
        await using var command = new Npgsql.NpgsqlCommand("SELECT count(*) FROM demo_charges WHERE order_id = @id", connection);
        command.Parameters.AddWithValue("id", created.Headers.Location!.ToString().Split('/')[^1]);
        return (long)(await command.ExecuteScalarAsync())!;
    }
}
