using System.Buffers;
using System.IO.Compression;
using System.Text;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Http.Features;
using Microsoft.AspNetCore.ResponseCompression;
using Microsoft.Extensions.DependencyInjection;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore.Tests;

/// <summary>
/// What an action does to its response, and what the layer stores of it: every way of writing a body ends up stored
/// whole or not at all, and a replay is the response the first caller got.
/// </summary>
[Collection(MiddlewareClusterCollection.Name)]
public sealed class ResponseFidelityTests(MiddlewareClusterFixture fixture)
{
    private const string Json = "{\"id\":\"order-1\",\"items\":[\"a\",\"b\",\"c\",\"a\",\"b\",\"c\",\"a\",\"b\",\"c\"]}";

    private MiddlewareHarness Harness(RequestDelegate endpoint, IdempotencyPolicy? policy = null) => new(fixture, endpoint, policy);

    // The layer behind response compression, as UseResponseCompression() before UseIdempotency() puts it.
    private static ResponseCompressionMiddleware BehindCompression(MiddlewareHarness harness) => new(
        async context => await harness.SendAsync(context),
        new ResponseCompressionProvider(new ServiceCollection().AddOptions().AddLogging().BuildServiceProvider(),
            Microsoft.Extensions.Options.Options.Create(new ResponseCompressionOptions { EnableForHttps = true })));

    // An endpoint whose HEAD requests are made idempotent, answering with headers alone.
    private MiddlewareHarness HeadHarness(Action<HttpResponse> answer) => Harness(context =>
    {
        answer(context.Response);
        return Task.CompletedTask;
    }, IdempotencyPolicy.Default with
    {
        Methods = System.Collections.Frozen.FrozenSet.ToFrozenSet(["HEAD"], StringComparer.OrdinalIgnoreCase),
        ConcurrentDuplicates = ConcurrentDuplicateHandling.Reject,
    });

    private static RequestDelegate Writes(string body) => async context =>
    {
        context.Response.StatusCode = 201;
        context.Response.ContentType = "application/json";
        await context.Response.WriteAsync(body);
    };

    [Fact]
    public async Task BehindResponseCompression_EachReplayIsEncodedForItsOwnClient_FromTheSameBytes()
    {
        var harness = Harness(Writes(Json));
        var compression = BehindCompression(harness);
        var key = MiddlewareHarness.NewKey();
        HttpContext Request(string? acceptEncoding) => MiddlewareHarness.Request(key, configure: c =>
        {
            if (acceptEncoding is not null)
            {
                c.Request.Headers.AcceptEncoding = acceptEncoding;
            }
        });

        var first = Request("gzip");
        await compression.Invoke(first);
        var gzipReplay = Request("gzip");
        await compression.Invoke(gzipReplay);
        var plainReplay = Request(null);
        await compression.Invoke(plainReplay);

        Assert.Equal("gzip", first.Response.Headers.ContentEncoding);
        Assert.Equal(Json, Gunzip(first.BodyBytes()));
        Assert.Equal("true", gzipReplay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal("gzip", gzipReplay.Response.Headers.ContentEncoding);
        Assert.Equal(Json, Gunzip(gzipReplay.BodyBytes()));
        Assert.Equal("true", plainReplay.Response.Headers["Idempotent-Replayed"]);
        Assert.True(string.IsNullOrEmpty(plainReplay.Response.Headers.ContentEncoding));
        Assert.Equal(Json, plainReplay.Body());
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task BehindResponseCompression_AnActionWhoseFirstWriteIsEmpty_IsStoredUnencoded_AndEncodedOnlyForAClientAskingForIt()
    {
        // Response compression decides at any write, an empty one too, and sets its Content-Encoding there.
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            context.Response.ContentType = "application/json";
            await context.Response.Body.WriteAsync(ReadOnlyMemory<byte>.Empty);
            await context.Response.WriteAsync(Json);
        });
        var compression = BehindCompression(harness);
        var key = MiddlewareHarness.NewKey();

        var first = MiddlewareHarness.Request(key, configure: c => c.Request.Headers.AcceptEncoding = "gzip");
        await compression.Invoke(first);
        var plainReplay = MiddlewareHarness.Request(key);
        await compression.Invoke(plainReplay);

        Assert.Equal("gzip", first.Response.Headers.ContentEncoding);
        Assert.Equal(Json, Gunzip(first.BodyBytes()));
        Assert.Equal("true", plainReplay.Response.Headers["Idempotent-Replayed"]);
        Assert.True(string.IsNullOrEmpty(plainReplay.Response.Headers.ContentEncoding));
        Assert.Equal(Json, plainReplay.Body());
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task ActionThatEncodesItsOwnBody_IsReplayedWithItsContentEncoding()
    {
        var gzipped = Gzip(Json);
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            context.Response.ContentType = "application/json";
            context.Response.Headers.ContentEncoding = "gzip";
            await context.Response.Body.WriteAsync(gzipped);
        });
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key);
        var replay = await harness.SendAsync(key);

        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal("gzip", replay.Response.Headers.ContentEncoding);
        Assert.Equal(gzipped, replay.BodyBytes());
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task HeaderAnOuterMiddlewareSetsFirst_IsReplayedOnce_NotTwice()
    {
        var harness = Harness(Writes(Json));
        var key = MiddlewareHarness.NewKey();
        HttpContext Request() => MiddlewareHarness.Request(key, configure: c => c.Response.Headers.CacheControl = "no-store");

        var first = await harness.SendAsync(Request());
        var replay = await harness.SendAsync(Request());

        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(first.Response.Headers.CacheControl.ToArray(), replay.Response.Headers.CacheControl.ToArray());
    }

    [Fact]
    public async Task BodyWriterBytesTheActionNeverFlushed_AreSentAndStored()
    {
        var harness = Harness(context =>
        {
            context.Response.StatusCode = 201;
            context.Response.BodyWriter.Write(Encoding.UTF8.GetBytes(Json));
            return Task.CompletedTask;
        });
        var key = MiddlewareHarness.NewKey();

        var first = await harness.SendAsync(key);
        var replay = await harness.SendAsync(key);

        Assert.Equal(Json, first.Body());
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(Json, replay.Body());
    }

    [Fact]
    public async Task FileSentByTheAction_IsStoredAsItsClientGotIt_AndReplayed()
    {
        var file = Path.GetTempFileName();
        try
        {
            await File.WriteAllTextAsync(file, "header;" + Json + ";trailer");
            var harness = Harness(context =>
            {
                context.Response.StatusCode = 201;
                return context.Response.SendFileAsync(file, "header;".Length, Json.Length);
            });
            var key = MiddlewareHarness.NewKey();

            var first = await harness.SendAsync(key);
            File.Delete(file);
            var replay = await harness.SendAsync(key);

            Assert.Equal(Json, first.Body());
            Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
            Assert.Equal(Json, replay.Body());
        }
        finally
        {
            File.Delete(file);
        }
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task BodyWriterBytesNotYetFlushed_ComeBeforeWhatTheActionThenWritesToBody(bool writesAsync)
    {
        // As a server's own body feature keeps them: one pipe behind both, so order is the order of the writes.
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            context.Response.BodyWriter.Write("{\"id\":"u8);
            if (writesAsync)
            {
                await context.Response.Body.WriteAsync("\"order-1\""u8.ToArray());
                await context.Response.Body.FlushAsync();
            }
            else
            {
                context.Response.Body.Write("\"order-1\""u8);
                context.Response.Body.Flush();
            }

            context.Response.BodyWriter.Write("}"u8);
        });
        var key = MiddlewareHarness.NewKey();

        var first = await harness.SendAsync(key);
        var replay = await harness.SendAsync(key);

        Assert.Equal("{\"id\":\"order-1\"}", first.Body());
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal("{\"id\":\"order-1\"}", replay.Body());
    }

    [Fact]
    public async Task TrailersOfTheFirstResponse_AreReplayed_WhereTheResponseCanCarryThem()
    {
        // As a gRPC backend behind the gateway answers: its status in the trailers, after the body.
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 200;
            await context.Response.WriteAsync(Json);
            context.Response.AppendTrailer("grpc-status", "5");
            context.Response.AppendTrailer("grpc-message", "not found");
        });
        var key = MiddlewareHarness.NewKey();
        HttpContext Request(bool carriesTrailers) => MiddlewareHarness.Request(key, configure: c =>
        {
            if (carriesTrailers)
            {
                c.Features.Set<IHttpResponseTrailersFeature>(new Trailers());
            }
        });

        await harness.SendAsync(Request(carriesTrailers: true));
        var replay = await harness.SendAsync(Request(carriesTrailers: true));
        var withoutTrailers = await harness.SendAsync(Request(carriesTrailers: false));

        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        var trailers = replay.Features.GetRequiredFeature<IHttpResponseTrailersFeature>().Trailers;
        Assert.Equal("5", trailers["grpc-status"]);
        Assert.Equal("not found", trailers["grpc-message"]);
        Assert.Equal(Json, replay.Body());
        Assert.Equal(Json, withoutTrailers.Body());
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task GrpcErrorSentInItsHeadersAlone_IsReplayedWithItsStatus()
    {
        // gRPC's "trailers-only" answer, as a gRPC server sends an error raised before any message: no body, its status
        // in the headers.
        var harness = Harness(context =>
        {
            context.Response.StatusCode = 200;
            context.Response.ContentType = "application/grpc";
            context.Response.Headers["grpc-status"] = "5";
            context.Response.Headers["grpc-message"] = "not found";
            context.Response.Headers["grpc-status-details-bin"] = "CAU";
            return Task.CompletedTask;
        });
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key);
        var replay = await harness.SendAsync(key);

        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal("5", replay.Response.Headers["grpc-status"]);
        Assert.Equal("not found", replay.Response.Headers["grpc-message"]);
        Assert.Equal("CAU", replay.Response.Headers["grpc-status-details-bin"]);
        Assert.Equal(1, harness.Executions);
    }

    private sealed class Trailers : IHttpResponseTrailersFeature
    {
        IHeaderDictionary IHttpResponseTrailersFeature.Trailers { get; set; } = new HeaderDictionary();
    }

    [Fact]
    public async Task ActionThatDisposesTheResponseStream_IsStoredAndReplayed()
    {
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            await using var writer = new StreamWriter(context.Response.Body);
            await writer.WriteAsync(Json);
        });
        var key = MiddlewareHarness.NewKey();

        var first = await harness.SendAsync(key);
        var replay = await harness.SendAsync(key);

        Assert.Equal(Json, first.Body());
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(Json, replay.Body());
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task ActionThatAbortsTheConnectionMidResponse_LeavesTheKeyInDoubt_NotItsPartialBodyStored()
    {
        // What YARP does when the backend fails mid-body: abort the client's connection and return.
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            await context.Response.WriteAsync("{\"id\":\"order-1\",\"ite");
            context.Abort();
        });
        var key = MiddlewareHarness.NewKey();
        using var connection = new CancellationTokenSource();

        await harness.SendAsync(MiddlewareHarness.Request(key, configure: c => c.Features.Set<IHttpRequestLifetimeFeature>(new Connection(connection))));

        await harness.AssertLeftInDoubtAsync(key);
    }

    [Fact]
    public async Task ActionWritingLessThanItsContentLength_LeavesTheKeyInDoubt_NotItsShortBodyStored()
    {
        // Kestrel answers such a response with a 500, or aborts it once begun: its client never gets it whole.
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            context.Response.ContentLength = 100;
            await context.Response.WriteAsync("{\"id\":\"order-1\"}");
        });
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key);

        await harness.AssertLeftInDoubtAsync(key);
    }

    [Fact]
    public async Task HeadAnsweredWithAContentLengthAndNoBody_IsStoredAsItIs_ItsContentLengthReplayed()
    {
        var harness = HeadHarness(response =>
        {
            response.StatusCode = 200;
            response.ContentLength = 100;
        });
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key, body: "", method: "HEAD");
        var replay = await harness.SendAsync(key, body: "", method: "HEAD");

        Assert.Equal(200, replay.Response.StatusCode);
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        // A HEAD's Content-Length tells the size of the body a GET would get: the first caller was told it.
        Assert.Equal(100, replay.Response.ContentLength);
        Assert.Empty(replay.BodyBytes());
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task HeadAnsweredWithItsOwnContentEncodingAndNoBody_IsReplayedWithThatContentEncoding()
    {
        // The headers a GET would get: the length and encoding of the body it would carry.
        var harness = HeadHarness(response =>
        {
            response.StatusCode = 200;
            response.ContentLength = 100;
            response.Headers.ContentEncoding = "gzip";
        });
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key, body: "", method: "HEAD");
        var replay = await harness.SendAsync(key, body: "", method: "HEAD");

        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(100, replay.Response.ContentLength);
        Assert.Equal("gzip", replay.Response.Headers.ContentEncoding);
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task ActionThatResetsItsHttp2StreamMidResponse_LeavesTheKeyInDoubt_NotItsPartialBodyStored()
    {
        // YARP resets the stream instead of aborting the connection where the server offers it (HTTP/2, HTTP/3).
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            await context.Response.WriteAsync("{\"id\":\"order-1\",\"ite");
            context.Features.GetRequiredFeature<IHttpResetFeature>().Reset(8);
        });
        var key = MiddlewareHarness.NewKey();
        var stream = new Http2Stream();

        await harness.SendAsync(MiddlewareHarness.Request(key, configure: c => c.Features.Set<IHttpResetFeature>(stream)));

        Assert.Equal(8, stream.ResetWith);
        await harness.AssertLeftInDoubtAsync(key);
    }

    [Fact]
    public async Task ActionThatResetsItsStreamThenThrows_LeavesTheKeyInDoubt_InsteadOfReleasingIt()
    {
        // Kestrel fires the request's token after a reset or an abort, not within it: the exception cannot tell.
        var harness = Harness(context =>
        {
            context.Features.GetRequiredFeature<IHttpResetFeature>().Reset(2);
            throw new InvalidOperationException("The backend failed after the request was sent.");
        });
        var key = MiddlewareHarness.NewKey();

        await Assert.ThrowsAsync<InvalidOperationException>(() =>
            harness.SendAsync(MiddlewareHarness.Request(key, configure: c => c.Features.Set<IHttpResetFeature>(new Http2Stream()))));

        await harness.AssertLeftInDoubtAsync(key);
    }

    [Fact]
    public async Task ActionThatCompletesBodyWriterSynchronously_IsStoredAndReplayed_WhereTheServerRefusesSynchronousWrites()
    {
        // Kestrel's writer completes without blocking; its stream refuses synchronous writes (AllowSynchronousIO).
        var harness = Harness(context =>
        {
            CreatesThroughACompletedWriter(context);
            return Task.CompletedTask;
        });
        var key = MiddlewareHarness.NewKey();
        HttpContext Request() => MiddlewareHarness.Request(key, configure: c => c.Response.Body = new AsynchronousOnly());

        var first = await harness.SendAsync(Request());
        var replay = await harness.SendAsync(Request());

        Assert.Equal(Json, first.Body());
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(Json, replay.Body());
    }

    [Fact]
    public async Task ActionThatCompletesBodyWriterThenThrows_ItsClientGetsTheResponse_AndTheKeyIsLeftInDoubt()
    {
        // Kestrel sends a completed writer's response at once: the action's later failure does not take it back.
        var harness = Harness(context =>
        {
            CreatesThroughACompletedWriter(context);
            throw new InvalidOperationException("A step after the response failed.");
        });
        var key = MiddlewareHarness.NewKey();
        var body = new AsynchronousOnly();
        var server = new CompletionRecordingBody(body);
        var first = MiddlewareHarness.Request(key, configure: c =>
        {
            c.Response.Body = body;
            c.Features.Set<IHttpResponseBodyFeature>(server);
        });

        await Assert.ThrowsAsync<InvalidOperationException>(() => harness.SendAsync(first));

        Assert.Equal(Json, first.Body());
        Assert.True(server.Completed);
        await harness.AssertLeftInDoubtAsync(key);
    }

    [Fact]
    public async Task ActionThatCompletesBodyWriterWithAnException_ThenThrows_HasItsKeyReleased_AsNothingWasSent()
    {
        // A writer completed with an exception sends nothing: a server answers 500 and the action did not answer.
        var harness = Harness(context =>
        {
            context.Response.BodyWriter.Write(Encoding.UTF8.GetBytes(Json));
            context.Response.BodyWriter.Complete(new InvalidOperationException("The body could not be made."));
            throw new InvalidOperationException("The body could not be made.");
        });
        var key = MiddlewareHarness.NewKey();

        await Assert.ThrowsAsync<InvalidOperationException>(() => harness.SendAsync(MiddlewareHarness.Request(key)));

        Assert.Equal(IdempotencyStatus.None, (await harness.Grain(key).GetAsync()).Status);
    }

    [Fact]
    public async Task ActionThatCompletesBodyWriterWithAnException_AndReturns_FailsAsIfItThrew_AndItsKeyIsReleased()
    {
        // A pipe's producer reports failure so: a server answers 500, and nothing of the body is an outcome.
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            context.Response.BodyWriter.Write(Encoding.UTF8.GetBytes(Json));
            await context.Response.BodyWriter.CompleteAsync(new IOException("The body's source failed."));
        });
        var key = MiddlewareHarness.NewKey();

        await Assert.ThrowsAsync<IOException>(() => harness.SendAsync(MiddlewareHarness.Request(key)));
        Assert.Equal(IdempotencyStatus.None, (await harness.Grain(key).GetAsync()).Status);
        await Assert.ThrowsAsync<IOException>(() => harness.SendAsync(MiddlewareHarness.Request(key)));

        Assert.Equal(2, harness.Executions);
    }

    [Fact]
    public async Task ActionThatCompletesBodyWriterWithAnException_AfterPartOfItsBodyWentOut_LeavesTheKeyInDoubt()
    {
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            await context.Response.BodyWriter.WriteAsync(Encoding.UTF8.GetBytes(Json[..10]));
            context.Response.BodyWriter.Complete(new IOException("The body's source failed."));
        });
        var key = MiddlewareHarness.NewKey();

        await Assert.ThrowsAsync<IOException>(() => harness.SendAsync(MiddlewareHarness.Request(key)));

        await harness.AssertLeftInDoubtAsync(key);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task WriteOrFlushTheServerRefusesBeforeAnythingWasSent_IsNoResponseBegun_AndTheKeyIsReleased(bool flush)
    {
        // Kestrel refuses a synchronous write or flush (AllowSynchronousIO) before it starts the response, then answers 500.
        var harness = Harness(context =>
        {
            context.Response.StatusCode = 201;
            if (flush)
            {
                context.Response.Body.Flush();
            }

            context.Response.Body.Write(Encoding.UTF8.GetBytes(Json));
            return Task.CompletedTask;
        });
        var key = MiddlewareHarness.NewKey();

        await Assert.ThrowsAsync<InvalidOperationException>(() =>
            harness.SendAsync(MiddlewareHarness.Request(key, configure: c => c.Response.Body = new AsynchronousOnly())));

        Assert.Equal(IdempotencyStatus.None, (await harness.Grain(key).GetAsync()).Status);
    }

    [Fact]
    public async Task BytesTheServerRefused_AreNotStored_OnlyTheAnswerTheClientGot()
    {
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            try
            {
                context.Response.Body.Write("AAA"u8);
            }
            catch (InvalidOperationException)
            {
                context.Response.StatusCode = 422;
                await context.Response.Body.WriteAsync("BBB"u8.ToArray());
            }
        });
        var key = MiddlewareHarness.NewKey();
        HttpContext Request() => MiddlewareHarness.Request(key, configure: c => c.Response.Body = new AsynchronousOnly());

        var first = await harness.SendAsync(Request());
        var replay = await harness.SendAsync(Request());

        Assert.Equal("BBB", first.Body());
        Assert.Equal(422, replay.Response.StatusCode);
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal("BBB", replay.Body());
    }

    [Fact]
    public async Task ActionWritingThroughBeginWrite_IsStoredAndReplayed_WhereTheServerRefusesSynchronousWrites()
    {
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            var bytes = Encoding.UTF8.GetBytes(Json);
            await Task.Factory.FromAsync(context.Response.Body.BeginWrite, context.Response.Body.EndWrite, bytes, 0, bytes.Length, null);
        });
        var key = MiddlewareHarness.NewKey();
        HttpContext Request() => MiddlewareHarness.Request(key, configure: c => c.Response.Body = new AsynchronousOnly());

        var first = await harness.SendAsync(Request());
        var replay = await harness.SendAsync(Request());

        Assert.Equal(Json, first.Body());
        Assert.Equal(Json, replay.Body());
        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
    }

    /// <summary>A server's body feature that records whether the response was ended.</summary>
    private sealed class CompletionRecordingBody(Stream body) : StreamResponseBodyFeature(body)
    {
        public bool Completed { get; private set; }

        public override Task CompleteAsync()
        {
            Completed = true;
            return base.CompleteAsync();
        }
    }

    private static void CreatesThroughACompletedWriter(HttpContext context)
    {
        context.Response.StatusCode = 201;
        context.Response.BodyWriter.Write(Encoding.UTF8.GetBytes(Json));
        context.Response.BodyWriter.Complete();
    }

    /// <summary>A response body that refuses synchronous writes, as Kestrel's does unless AllowSynchronousIO is set.</summary>
    private sealed class AsynchronousOnly : MemoryStream
    {
        // MemoryStream's asynchronous writes are its synchronous ones, run inline.
        private bool asynchronous;

        public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
        {
            asynchronous = true;
            try
            {
                await base.WriteAsync(buffer, cancellationToken);
            }
            finally
            {
                asynchronous = false;
            }
        }

        public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
            WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

        public override Task FlushAsync(CancellationToken cancellationToken) => Task.CompletedTask;

        public override void Write(byte[] buffer, int offset, int count)
        {
            RefuseSynchronous();
            base.Write(buffer, offset, count);
        }

        public override void Write(ReadOnlySpan<byte> buffer)
        {
            RefuseSynchronous();
            base.Write(buffer);
        }

        public override void Flush() => RefuseSynchronous();

        private void RefuseSynchronous()
        {
            if (!asynchronous)
            {
                throw new InvalidOperationException("Synchronous operations are disallowed.");
            }
        }
    }

    [Fact]
    public async Task ActionThatReplacesItsResponseOnceBegun_LeavesTheKeyInDoubt_InsteadOfReleasingIt()
    {
        // A proxy whose client has gone (so nothing was sent) answers 502 when the backend fails mid-body: the
        // backend's 201 had begun, so its action took effect.
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            await context.Response.WriteAsync("{\"id\":\"order-1\",\"ite");
            context.Response.StatusCode = 502;
        });
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key);

        await harness.AssertLeftInDoubtAsync(key);
    }

    [Fact]
    public async Task ResponseWhoseStatusChangesToAnotherStorableOne_IsStored()
    {
        // What an OnStarting callback setting 202 looks like to the layer: not a failure replacing the response.
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            await context.Response.WriteAsync(Json);
            context.Response.StatusCode = 202;
        });
        var key = MiddlewareHarness.NewKey();

        await harness.SendAsync(key);
        var replay = await harness.SendAsync(key);

        Assert.Equal("true", replay.Response.Headers["Idempotent-Replayed"]);
        Assert.Equal(202, replay.Response.StatusCode);
        Assert.Equal(Json, replay.Body());
        Assert.Equal(1, harness.Executions);
    }

    [Fact]
    public async Task ActionThatThrowsAfterItsResponseBegan_LeavesTheKeyInDoubt_InsteadOfReleasingIt()
    {
        var harness = Harness(async context =>
        {
            context.Response.StatusCode = 201;
            await context.Response.WriteAsync("{\"id\":\"order-1\",");
            throw new InvalidOperationException("the serializer failed halfway");
        });
        var key = MiddlewareHarness.NewKey();

        await Assert.ThrowsAsync<InvalidOperationException>(() => harness.SendAsync(key));

        await harness.AssertLeftInDoubtAsync(key);
    }

    private static byte[] Gzip(string text)
    {
        using var output = new MemoryStream();
        using (var gzip = new GZipStream(output, CompressionLevel.Fastest))
        {
            gzip.Write(Encoding.UTF8.GetBytes(text));
        }

        return output.ToArray();
    }

    private static string Gunzip(byte[] bytes)
    {
        using var gzip = new GZipStream(new MemoryStream(bytes), CompressionMode.Decompress);
        using var reader = new StreamReader(gzip);
        return reader.ReadToEnd();
    }

    /// <summary>An HTTP/2 stream that remembers how it was reset.</summary>
    private sealed class Http2Stream : IHttpResetFeature
    {
        public int? ResetWith { get; private set; }

        public void Reset(int errorCode) => ResetWith = errorCode;
    }

    /// <summary>A connection whose <see cref="Abort"/> closes it, as Kestrel's does.</summary>
    private sealed class Connection(CancellationTokenSource closed) : IHttpRequestLifetimeFeature
    {
        public CancellationToken RequestAborted { get; set; } = closed.Token;

        public void Abort() => closed.Cancel();
    }
}
