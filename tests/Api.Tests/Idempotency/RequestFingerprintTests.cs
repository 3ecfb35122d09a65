using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;
using Microsoft.AspNetCore.Http;

namespace OrleansIdempotency.AspNetCore.Tests;

public sealed class RequestFingerprintTests
{
    // The framing every stored fingerprint was made with: a record written by one version of the layer must match the
    // same request sent to the next, so this is spelled out here independently of the implementation.
    private static byte[] Expected(string method, string path, string query, byte[] body)
    {
        var framed = new List<byte>();
        foreach (var part in new[] { method, path, query })
        {
            var bytes = Encoding.UTF8.GetBytes(part);
            var length = new byte[sizeof(int)];
            BinaryPrimitives.WriteInt32BigEndian(length, bytes.Length);
            framed.AddRange(length);
            framed.AddRange(bytes);
        }

        framed.AddRange(body);
        var bodyLength = new byte[sizeof(long)];
        BinaryPrimitives.WriteInt64BigEndian(bodyLength, body.Length);
        framed.AddRange(bodyLength);
        return SHA256.HashData(framed.ToArray());
    }

    private static HttpRequest Request(string method, string path, string query, byte[] body, int maxBytesPerRead = int.MaxValue, bool announceLength = true)
    {
        var context = new DefaultHttpContext();
        context.Request.Method = method;
        context.Request.Path = path;
        context.Request.QueryString = new QueryString(query.Length == 0 ? "" : "?" + query);
        context.Request.Body = new TrickleStream(body, maxBytesPerRead);
        context.Request.ContentLength = announceLength ? body.Length : null;
        return context.Request;
    }

    [Theory]
    [InlineData("a=1&a=2", "a=1&A=2", false)]
    [InlineData("b=2&a=1", "a=1&b=2", true)]
    [InlineData("a=%41", "a=A", true)]
    [InlineData("a=1&a=2", "a=2&a=1", false)]
    [InlineData("a=1", "A=1", false)]
    [InlineData("a=1&A=2", "A=1&a=2", false)]
    // The query as the endpoint reads it: ASP.NET Core's query collection gives these pairs the same names and
    // values (case-insensitive names, an escape that is not UTF-8 left as written, a name without '=' as empty).
    [InlineData("A=1&a=2", "a=1&a=2", true)]
    [InlineData("a=%FF", "a=%25FF", true)]
    [InlineData("flag", "flag=", true)]
    public async Task Fingerprint_OfTwoQueries_IsTheSameOnlyForTheSameParameters(string first, string second, bool same)
    {
        var one = await RequestFingerprint.ComputeAsync(Request("POST", "/a", first, []), 1024, default);
        var two = await RequestFingerprint.ComputeAsync(Request("POST", "/a", second, []), 1024, default);

        Assert.Equal(same, one!.AsSpan().SequenceEqual(two));
    }

    [Theory]
    [InlineData(0)]
    [InlineData(48)]
    [InlineData(16 * 1024)]
    [InlineData(100_000)]
    public async Task Fingerprint_IsSha256OfTheLengthPrefixedMethodPathQueryAndBody(int bodyBytes)
    {
        var body = RandomNumberGenerator.GetBytes(bodyBytes);

        var fingerprint = await RequestFingerprint.ComputeAsync(Request("POST", "/orders/ü", "a=1&b=%C3%A9", body), long.MaxValue, CancellationToken.None);

        Assert.Equal(Expected("POST", "/orders/ü", "a=1&b=%C3%A9", body), fingerprint);
    }

    [Fact]
    public async Task Fingerprint_DoesNotDependOnHowTheBodyArrives()
    {
        var body = RandomNumberGenerator.GetBytes(70_000);

        var whole = await RequestFingerprint.ComputeAsync(Request("PUT", "/a", "", body), long.MaxValue, CancellationToken.None);
        var trickled = await RequestFingerprint.ComputeAsync(Request("PUT", "/a", "", body, maxBytesPerRead: 7, announceLength: false), long.MaxValue, CancellationToken.None);

        Assert.Equal(Expected("PUT", "/a", "", body), whole);
        Assert.Equal(whole, trickled);
    }

    // "POST /a" without a query frames to 18 bytes before the body; the implementation gathers into 16 KB and hashes
    // what it has gathered once less than 4 KB is left: these sizes fill it to just below, at and past both edges.
    [Theory]
    [InlineData(12_269)]
    [InlineData(12_270)]
    [InlineData(12_271)]
    [InlineData(16_365)]
    [InlineData(16_366)]
    [InlineData(16_367)]
    [InlineData(32_750)]
    public async Task Fingerprint_OfBodiesAtTheBufferEdges_IsFramedTheSame(int bodyBytes)
    {
        var body = RandomNumberGenerator.GetBytes(bodyBytes);

        var whole = await RequestFingerprint.ComputeAsync(Request("POST", "/a", "", body), long.MaxValue, CancellationToken.None);
        var inReads = await RequestFingerprint.ComputeAsync(Request("POST", "/a", "", body, maxBytesPerRead: 4096), long.MaxValue, CancellationToken.None);

        Assert.Equal(Expected("POST", "/a", "", body), whole);
        Assert.Equal(whole, inReads);
    }

    [Fact]
    public async Task Fingerprint_OfAQueryLongerThanABuffer_IsFramedTheSame()
    {
        var value = new string('q', 40_000);

        var fingerprint = await RequestFingerprint.ComputeAsync(Request("POST", "/a", "long=" + value, [1, 2, 3]), long.MaxValue, CancellationToken.None);

        Assert.Equal(Expected("POST", "/a", "long=" + value, [1, 2, 3]), fingerprint);
    }

    [Fact]
    public async Task Fingerprint_LeavesTheBodyToBeReadWholeFromTheStart()
    {
        var body = RandomNumberGenerator.GetBytes(20_000);
        var request = Request("POST", "/a", "", body, maxBytesPerRead: 1000);

        await RequestFingerprint.ComputeAsync(request, long.MaxValue, CancellationToken.None);
        using var read = new MemoryStream();
        await request.Body.CopyToAsync(read);

        Assert.Equal(body, read.ToArray());
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task Fingerprint_IsNull_ForABodyPastTheLimit_AnnouncedOrNot(bool announceLength)
    {
        var body = new byte[20_001];

        var fingerprint = await RequestFingerprint.ComputeAsync(Request("POST", "/a", "", body, maxBytesPerRead: 4096, announceLength), 20_000, CancellationToken.None);

        Assert.Null(fingerprint);
    }

    [Fact]
    public async Task Fingerprint_OfABodyExactlyAtTheLimit_IsComputed()
    {
        var body = new byte[20_000];

        var fingerprint = await RequestFingerprint.ComputeAsync(Request("POST", "/a", "", body, maxBytesPerRead: 4096, announceLength: false), 20_000, CancellationToken.None);

        Assert.Equal(Expected("POST", "/a", "", body), fingerprint);
    }

    [Fact]
    public async Task Fingerprint_OfABodyAMiddlewareReadBeforeAndLeftAtItsEnd_IsOfTheWholeBody()
    {
        var body = RandomNumberGenerator.GetBytes(5000);
        var request = Request("POST", "/a", "", body);
        request.EnableBuffering();
        await request.Body.CopyToAsync(Stream.Null);

        var fingerprint = await RequestFingerprint.ComputeAsync(request, long.MaxValue, CancellationToken.None);

        Assert.Equal(Expected("POST", "/a", "", body), fingerprint);
    }

    [Fact]
    public async Task Fingerprint_OfAFormReadBeforeWithoutBuffering_IsOfTheForm_TellingFormsApartByFieldsValuesAndFiles()
    {
        // An antiforgery check before the layer reads the form and leaves the body's bytes gone.
        static async Task<byte[]?> FormAsync(string contentType, string body)
        {
            var context = new DefaultHttpContext();
            context.Request.Method = "POST";
            context.Request.Path = "/a";
            context.Request.ContentType = contentType;
            context.Request.Body = new OneWayStream(Encoding.UTF8.GetBytes(body));
            await context.Request.ReadFormAsync();
            return await RequestFingerprint.ComputeAsync(context.Request, 1024, CancellationToken.None);
        }

        const string urlEncoded = "application/x-www-form-urlencoded";
        const string multipart = "multipart/form-data; boundary=b";
        static string WithFile(string bytes) =>
            $"--b\r\nContent-Disposition: form-data; name=\"amount\"\r\n\r\n1\r\n--b\r\nContent-Disposition: form-data; name=\"receipt\"; filename=\"r.txt\"\r\nContent-Type: text/plain\r\n\r\n{bytes}\r\n--b--\r\n";

        var small = await FormAsync(urlEncoded, "amount=1&currency=EUR");
        Assert.Equal(small, await FormAsync(urlEncoded, "currency=EUR&amount=1"));
        Assert.NotEqual(small, await FormAsync(urlEncoded, "amount=1000&currency=EUR"));
        Assert.NotEqual(small, await FormAsync(urlEncoded, ""));
        Assert.NotEqual(await FormAsync(urlEncoded, "a=b&a=c&a=d"), await FormAsync(urlEncoded, "a=b&c=d"));
        Assert.Equal(await FormAsync(multipart, WithFile("abc")), await FormAsync(multipart, WithFile("abc")));
        Assert.NotEqual(await FormAsync(multipart, WithFile("abc")), await FormAsync(multipart, WithFile("abd")));
        Assert.Null(await FormAsync(multipart, WithFile(new string('x', 1025))));
    }

    [Fact]
    public async Task Fingerprint_OfAForm_IsOfItsFieldsAndFiles_WhateverItsBoundary_AndWhetherOrNotAMiddlewareReadItBefore()
    {
        static async Task<byte[]?> FormAsync(string contentType, string body, bool readBefore)
        {
            var context = new DefaultHttpContext();
            context.Request.Method = "POST";
            context.Request.Path = "/a";
            context.Request.ContentType = contentType;
            context.Request.Body = new OneWayStream(Encoding.UTF8.GetBytes(body));
            if (readBefore)
            {
                await context.Request.ReadFormAsync();
            }

            var fingerprint = await RequestFingerprint.ComputeAsync(context.Request, 1024, CancellationToken.None);
            if (!readBefore && fingerprint is not null)
            {
                // Rewound for the endpoint.
                Assert.Equal(body, await new StreamReader(context.Request.Body).ReadToEndAsync());
            }

            return fingerprint;
        }

        static string Multipart(string boundary, string file) =>
            $"--{boundary}\r\nContent-Disposition: form-data; name=\"amount\"\r\n\r\n1\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"receipt\"; " +
            $"filename=\"r.txt\"\r\nContent-Type: text/plain\r\n\r\n{file}\r\n--{boundary}--\r\n";

        // curl -F, a browser's FormData and Python's requests each pick a new boundary every time they send a form.
        var first = await FormAsync("multipart/form-data; boundary=b", Multipart("b", "abc"), readBefore: false);
        Assert.NotNull(first);
        Assert.Equal(first, await FormAsync("multipart/form-data; boundary=------------------------d74496d66958873e", Multipart("------------------------d74496d66958873e", "abc"), readBefore: false));
        Assert.Equal(first, await FormAsync("multipart/form-data; boundary=b", Multipart("b", "abc"), readBefore: true));
        Assert.NotEqual(first, await FormAsync("multipart/form-data; boundary=b", Multipart("b", "abd"), readBefore: false));
        Assert.Null(await FormAsync("multipart/form-data; boundary=b", Multipart("b", new string('x', 1025)), readBefore: false));
        // An urlencoded form has no boundary: sent again, its bytes are the same, and they are what is hashed (its
        // parsing would make a+b and a%2Bb alike).
        const string urlEncoded = "application/x-www-form-urlencoded";
        Assert.Equal(Expected("POST", "/a", "", "n=a+b"u8.ToArray()), await FormAsync(urlEncoded, "n=a+b", readBefore: false));

        // A form the reader refuses is hashed as the bytes it is, for the endpoint to judge.
        const string cutOff = "--b\r\nContent-Disposition: form-data; name=\"amount\"\r\n\r\n1";
        Assert.Equal(Expected("POST", "/a", "", Encoding.UTF8.GetBytes(cutOff)), await FormAsync("multipart/form-data; boundary=b", cutOff, readBefore: false));
    }

    [Fact]
    public async Task Fingerprint_OfAFormWhoseAntiforgeryTokenWasFoundInvalid_IsOfItsBytes_NotAThrow()
    {
        // The form refuses to be read then (the endpoint answers for the token); JSON sent to such an endpoint, too.
        foreach (var (contentType, body) in new[] { ("multipart/form-data; boundary=b", "--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b--\r\n"), ("application/json", "{}") })
        {
            var context = new DefaultHttpContext();
            context.Request.Method = "POST";
            context.Request.Path = "/a";
            context.Request.ContentType = contentType;
            context.Request.Body = new MemoryStream(Encoding.UTF8.GetBytes(body));
            context.Features.Set<Microsoft.AspNetCore.Antiforgery.IAntiforgeryValidationFeature>(new InvalidToken());
            // What UseAntiforgery leaves for the form to refuse itself by.
            context.Items["__AntiforgeryMiddlewareWithEndpointInvoked"] = true;
            await Assert.ThrowsAnyAsync<InvalidOperationException>(() => context.Request.ReadFormAsync());

            var fingerprint = await RequestFingerprint.ComputeAsync(context.Request, 1024, CancellationToken.None);

            Assert.Equal(Expected("POST", "/a", "", Encoding.UTF8.GetBytes(body)), fingerprint);
        }
    }

    private sealed class InvalidToken : Microsoft.AspNetCore.Antiforgery.IAntiforgeryValidationFeature
    {
        public bool IsValid => false;

        public Exception? Error { get; } = new InvalidOperationException("The antiforgery token is invalid (test).");
    }

    [Fact]
    public async Task Fingerprint_WithARoute_FramesItFirst_BehindAPartLengthNoPartHas()
    {
        var body = RandomNumberGenerator.GetBytes(100);

        var fingerprint = await RequestFingerprint.ComputeAsync(Request("POST", "/a", "b=1", body), "gateway route onA", long.MaxValue, CancellationToken.None);

        byte[] framed = [.. Int32(-1), .. Part("gateway route onA"), .. Part("POST"), .. Part("/a"), .. Part("b=1"), .. body, .. Int64(body.Length)];
        Assert.Equal(SHA256.HashData(framed), fingerprint);

        static byte[] Part(string text) => [.. Int32(Encoding.UTF8.GetByteCount(text)), .. Encoding.UTF8.GetBytes(text)];
        static byte[] Int32(int value)
        {
            var bytes = new byte[sizeof(int)];
            BinaryPrimitives.WriteInt32BigEndian(bytes, value);
            return bytes;
        }

        static byte[] Int64(long value)
        {
            var bytes = new byte[sizeof(long)];
            BinaryPrimitives.WriteInt64BigEndian(bytes, value);
            return bytes;
        }
    }

    [Fact]
    public async Task Fingerprint_TellsRoutesApart_ButNotTheHostsARequestNamed()
    {
        async Task<byte[]?> FingerprintAsync(string? route, string host)
        {
            var request = Request("POST", "/a", "", [1, 2, 3]);
            request.Headers.Host = host;
            return await RequestFingerprint.ComputeAsync(request, route, long.MaxValue, CancellationToken.None);
        }

        var onA = await FingerprintAsync("hosts a.example", "a.example");

        Assert.Equal(onA, await FingerprintAsync("hosts a.example", "A.EXAMPLE:8443"));
        Assert.NotEqual(onA, await FingerprintAsync("hosts b.example", "b.example"));
        Assert.NotEqual(onA, await FingerprintAsync(null, "a.example"));
        Assert.Equal(Expected("POST", "/a", "", [1, 2, 3]), await FingerprintAsync(null, "a.example"));
        Assert.Equal(Expected("POST", "/a", "", [1, 2, 3]), await FingerprintAsync(null, "b.example"));
    }

    private sealed class OneWayStream(byte[] data) : MemoryStream(data, writable: false)
    {
        public override bool CanSeek => false;

        public override long Position
        {
            get => throw new NotSupportedException();
            set => throw new NotSupportedException();
        }

        public override long Seek(long offset, SeekOrigin loc) => throw new NotSupportedException();
    }

    /// <summary>A request body that hands out at most a few bytes per read, as a slow client's would arrive.</summary>
    private sealed class TrickleStream(byte[] data, int maxBytesPerRead) : MemoryStream(data, writable: false)
    {
        public override int Read(byte[] buffer, int offset, int count) => base.Read(buffer, offset, Math.Min(count, maxBytesPerRead));

        public override int Read(Span<byte> buffer) => base.Read(buffer[..Math.Min(buffer.Length, maxBytesPerRead)]);

        public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
            base.ReadAsync(buffer, offset, Math.Min(count, maxBytesPerRead), cancellationToken);

        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) =>
            base.ReadAsync(buffer[..Math.Min(buffer.Length, maxBytesPerRead)], cancellationToken);
    }
}
