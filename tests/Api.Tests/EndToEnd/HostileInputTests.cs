using OrleansIdempotency.Grains;
using System.Text;
using Npgsql;

namespace OrleansIdempotency.Api.Tests.EndToEnd;

/// <summary>
/// Bad requests, table-driven, over real HTTP: each gets its documented status and a problem+json body, none gets
/// a 500, none runs the action, and the store gains no record it should not.
/// </summary>
[Collection(EndToEndCollection.Name)]
public sealed class HostileInputTests(EndToEndFixture fixture)
{
    private const string Alice = "Bearer demo-alice";
    private const string Order = Requests.OrderBody;

    /// <param name="Name">What the case is.</param>
    /// <param name="Status">The documented status.</param>
    /// <param name="Problem">The problem type's last segment, or "" for a problem written by ASP.NET Core (401, validation).</param>
    /// <param name="Claims">Whether the layer claims the key: a request that reaches the action and fails there (a 4xx) is stored and replayed.</param>
    public sealed record BadRequest(string Name, string Method, string Target, (string Name, string Value)[] Headers, byte[] Body, int Status, string Problem, bool Claims = false)
    {
        public override string ToString() => Name;
    }

    public static TheoryData<BadRequest> Cases()
    {
        static (string, string)[] With(string? key, params (string, string)[] more) =>
            [("Authorization", Alice), ("Content-Type", "application/json"), .. key is null ? [] : new[] { ("Idempotency-Key", key) }, .. more];
        static BadRequest Key(string name, string key) => new(name, "POST", "/orders", With(key), Encoding.UTF8.GetBytes(Order), 400, "key-invalid");
        static BadRequest Body(string name, string body, int status = 400) => new(name, "POST", "/orders", With(Guid.NewGuid().ToString()), Encoding.UTF8.GetBytes(body), status, "", Claims: true);
        static BadRequest Auth(string name, params (string, string)[] headers) =>
            new(name, "POST", "/orders", [("Content-Type", "application/json"), ("Idempotency-Key", Guid.NewGuid().ToString()), .. headers], Encoding.UTF8.GetBytes(Order), 401, "");

        var data = new TheoryData<BadRequest>
        {
            // Header fuzz
            new("no key", "POST", "/orders", With(null), Encoding.UTF8.GetBytes(Order), 400, "key-missing"),
            Key("empty key", ""),
            Key("blank key", "   "),
            Key("256 characters", new string('a', 256)),
            Key("10,000 characters", new string('b', 10_000)),
            Key("30,000 characters", new string('c', 30_000)),
            Key("comma", "a,b"),
            Key("comma and space", "a, b"),
            Key("list of two", "\"a\", \"b\""),
            Key("space inside", "a b"),
            Key("tab inside", "a\tb"),
            Key("control character", "a\u0001b"),
            Key("DEL character", "a\u007fb"),
            Key("non-ASCII", "cl\u00e9"),
            Key("emoji", "key-\U0001F600"),
            Key("quoted non-ASCII", "\"cl\u00e9\""),
            Key("quoted comma", "\"a,b\""),
            Key("unterminated quote", "\"abc"),
            Key("text after the quote", "\"abc\"def"),
            Key("parameters", "abc;v=1"),
            Key("bad escape", "\"a\\nb\""),
            Key("empty quoted string", "\"\""),
            Key("SQL, unquoted", "1';DROP TABLE OrleansStorage;--"),
            Key("brackets", "<script>"),
            Key("equals and semicolon", "a=b;c"),
            new("two key headers", "POST", "/orders", [.. With("one"), ("Idempotency-Key", "two")], Encoding.UTF8.GetBytes(Order), 400, "key-invalid"),
            // Bodies the action refuses: stored as the 4xx they are, and replayed
            Body("malformed JSON", "{\"customerId\":"),
            Body("empty body", ""),
            Body("wrong types", "{\"customerId\":1,\"amount\":\"x\",\"items\":{}}"),
            Body("negative amount", "{\"customerId\":\"c\",\"amount\":-1,\"items\":[{\"sku\":\"A\",\"quantity\":1}]}"),
            Body("no items", "{\"customerId\":\"c\",\"amount\":1,\"items\":[]}"),
            Body("number out of range", "{\"customerId\":\"c\",\"amount\":1e400,\"items\":[{\"sku\":\"A\",\"quantity\":1}]}"),
            Body("nested 1,000 deep", new string('[', 1000) + new string(']', 1000)),
            Body("not JSON at all", "\u0000\u0001\u0002"),
            Body("NUL in the customer id", "{\"customerId\":\"c\\u0000\",\"amount\":1,\"items\":[{\"sku\":\"A\",\"quantity\":1}]}"),
            Body("control character in a SKU", "{\"customerId\":\"c\",\"amount\":1,\"items\":[{\"sku\":\"A\\u0007\",\"quantity\":1}]}"),
            Body("null item", "{\"customerId\":\"c\",\"amount\":1,\"items\":[null]}"),
            Body("a third decimal of the amount", "{\"customerId\":\"c\",\"amount\":0.015,\"items\":[{\"sku\":\"A\",\"quantity\":1}]}"),
            new("payment of a tenth of a cent", "POST", "/payments", With(Guid.NewGuid().ToString()), Encoding.UTF8.GetBytes("{\"amount\":0.001}"), 400, "", Claims: true),
            // Oversized
            new("body over 10 MiB", "POST", "/orders", With(Guid.NewGuid().ToString()), new byte[(10 * 1024 * 1024) + 1], 413, "body-too-large"),
            // Credentials
            Auth("no credentials"),
            Auth("unknown API key", ("Authorization", "Bearer not-a-key")),
            Auth("empty bearer", ("Authorization", "Bearer ")),
            Auth("basic scheme", ("Authorization", "Basic ZGVtby1hbGljZTo=")),
            Auth("two authorizations", ("Authorization", "Bearer demo-alice"), ("Authorization", "Bearer demo-bob")),
            Auth("SQL in the API key", ("Authorization", "Bearer ' OR 1=1 --")),
            // The demo's own headers
            new("delay out of range", "POST", "/orders", With(Guid.NewGuid().ToString(), ("X-Demo-Delay-Ms", "99999")), Encoding.UTF8.GetBytes(Order), 400, "", Claims: true),
            new("delay negative", "POST", "/orders", With(Guid.NewGuid().ToString(), ("X-Demo-Delay-Ms", "-5")), Encoding.UTF8.GetBytes(Order), 400, "", Claims: true),
            new("fail not a 5xx", "POST", "/orders", With(Guid.NewGuid().ToString(), ("X-Demo-Fail", "teapot")), Encoding.UTF8.GetBytes(Order), 400, "", Claims: true),
        };
        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public async Task Hostile_GetsItsDocumentedProblem_RunsNothing_AndStoresNothingItShouldNot(BadRequest bad)
    {
        var recordsBefore = await CountAsync("SELECT count(*) FROM OrleansStorage");
        var ordersBefore = await CountAsync("SELECT count(*) FROM demo_orders");
        var paymentsBefore = await CountAsync("SELECT count(*) FROM demo_payments");

        var response = await RawHttp.SendAsync(fixture.Api.BaseAddress, bad.Method, bad.Target, bad.Headers, bad.Body);

        Assert.Equal(bad.Status, response.Status);
        Assert.StartsWith("application/problem+json", response.ContentType, StringComparison.Ordinal);
        var problem = System.Text.Json.JsonDocument.Parse(response.Body).RootElement;
        Assert.Equal(bad.Status, problem.GetProperty("status").GetInt32());
        if (bad.Problem.Length > 0)
        {
            Assert.EndsWith("/" + bad.Problem, problem.GetProperty("type").GetString(), StringComparison.Ordinal);
            Assert.True(problem.TryGetProperty("retryable", out _));
        }

        Assert.Equal(ordersBefore, await CountAsync("SELECT count(*) FROM demo_orders"));
        Assert.Equal(paymentsBefore, await CountAsync("SELECT count(*) FROM demo_payments"));
        Assert.Equal(recordsBefore + (bad.Claims ? 1 : 0), await CountAsync("SELECT count(*) FROM OrleansStorage"));
        if (bad.Claims)
        {
            var replay = await RawHttp.SendAsync(fixture.Api.BaseAddress, bad.Method, bad.Target, bad.Headers, bad.Body);
            Assert.Equal(response.Body, replay.Body);
            Assert.Equal("true", replay.Headers.GetValueOrDefault("idempotent-replayed"));
        }
    }

    [Fact]
    public async Task MalformedChunkedBody_Answers400ProblemNot500_RunsNothing_AndIsNotLoggedAsAServerError()
    {
        var recordsBefore = await CountAsync("SELECT count(*) FROM OrleansStorage");
        var ordersBefore = await CountAsync("SELECT count(*) FROM demo_orders");
        var headers = new[]
        {
            ("Authorization", Alice), ("Content-Type", "application/json"), ("Idempotency-Key", Guid.NewGuid().ToString()),
            ("Transfer-Encoding", "chunked"),
        };

        // Kestrel finds the broken chunk size only when the layer reads the body to fingerprint it.
        var response = await RawHttp.SendAsync(fixture.Api.BaseAddress, "POST", "/orders", headers, "4\r\n{\"a\"\r\nzz\r\n"u8.ToArray());

        Assert.Equal(400, response.Status);
        Assert.StartsWith("application/problem+json", response.ContentType, StringComparison.Ordinal);
        Assert.Contains("/body-unreadable", Encoding.UTF8.GetString(response.Body), StringComparison.Ordinal);
        Assert.Equal(ordersBefore, await CountAsync("SELECT count(*) FROM demo_orders"));
        Assert.Equal(recordsBefore, await CountAsync("SELECT count(*) FROM OrleansStorage"));
        // The client's mistake (or a client that hung up mid-body): logged before the answer is written, if at all.
        Assert.DoesNotContain(fixture.Api.Errors.Exceptions, e => e is Microsoft.AspNetCore.Http.BadHttpRequestException);
    }

    [Theory]
    [InlineData("\"'; DROP TABLE OrleansStorage; --\"", "'; DROP TABLE OrleansStorage; --")]
    [InlineData("../../etc/passwd", "../../etc/passwd")]
    [InlineData("%00%2e%2e", "%00%2e%2e")]
    [InlineData("\"\\\"quoted\\\\\"", "\"quoted\\")]
    public async Task KeysThatLookLikeSqlOrPaths_AreJustKeys_RunOnceAndReplay(string header, string key)
    {
        var headers = new[] { ("Authorization", Alice), ("Content-Type", "application/json"), ("Idempotency-Key", header) };
        var body = Encoding.UTF8.GetBytes(Requests.OrderBody.Replace("c-1", Guid.NewGuid().ToString(), StringComparison.Ordinal));

        var first = await RawHttp.SendAsync(fixture.Api.BaseAddress, "POST", "/orders", headers, body);
        var replay = await RawHttp.SendAsync(fixture.Api.BaseAddress, "POST", "/orders", headers, body);

        Assert.Equal(201, first.Status);
        Assert.Equal(first.Body, replay.Body);
        Assert.Equal("true", replay.Headers.GetValueOrDefault("idempotent-replayed"));
        Assert.Equal(1, await fixture.CountAsync("demo_orders", header));
        await using var connection = new NpgsqlConnection(fixture.Postgres);
        await connection.OpenAsync();
        await using var command = new NpgsqlCommand("SELECT count(*) FROM OrleansStorage WHERE GrainIdExtensionString = @key", connection);
        command.Parameters.AddWithValue("key", new IdempotencyKey("user:alice", key).ToGrainKey());
        Assert.Equal(1L, await command.ExecuteScalarAsync());
    }

    [Fact]
    public async Task AliceAndBob_SameKeyUnderConcurrency_NeverSeeEachOthersBytes()
    {
        var key = Guid.NewGuid().ToString();
        using var alice = fixture.Api.Client("demo-alice");
        using var bob = fixture.Api.Client("demo-bob");
        var aliceBody = Requests.OrderBody.Replace("c-1", "alice-customer", StringComparison.Ordinal);
        var bobBody = Requests.OrderBody.Replace("c-1", "bob-customer", StringComparison.Ordinal);

        var requests = Enumerable.Range(0, 100).Select(i => i % 2 == 0
            ? alice.SendAsync("/orders", key, aliceBody, ("X-Demo-Delay-Ms", "100"))
            : bob.SendAsync("/orders", key, bobBody, ("X-Demo-Delay-Ms", "100"))).ToArray();
        var responses = await Task.WhenAll(requests);

        var aliceBytes = responses.Where((_, i) => i % 2 == 0).Select(r => Encoding.UTF8.GetString(r.Body)).Distinct().ToArray();
        var bobBytes = responses.Where((_, i) => i % 2 == 1).Select(r => Encoding.UTF8.GetString(r.Body)).Distinct().ToArray();
        Assert.Single(aliceBytes);
        Assert.Single(bobBytes);
        Assert.Contains("alice-customer", aliceBytes[0], StringComparison.Ordinal);
        Assert.Contains("bob-customer", bobBytes[0], StringComparison.Ordinal);
        Assert.Equal(2, await fixture.CountAsync("demo_orders", key));
    }

    private async Task<long> CountAsync(string sql)
    {
        await using var connection = new NpgsqlConnection(fixture.Postgres);
        await connection.OpenAsync();
        await using var command = new NpgsqlCommand(sql, connection);
        return (long)(await command.ExecuteScalarAsync())!;
    }
}
